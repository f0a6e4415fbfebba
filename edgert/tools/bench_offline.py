"""`edgert bench BUNDLE --offline`: the engine's throughput with continuous batching against the
same workload through the same engine one sequence at a time (max_num_seqs=1), or (`--versus
one-decode-call`) with every decoder in one call instead of length classes; run side by side in
one process so the ratio is measured under identical conditions.

Prompts are slices of the stdlib's pydoc topics (plain English every Python has); every request
decodes a fixed number of tokens (ignore_eos) so both runs do exactly the same work."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from edgert.config import EngineConfig
from edgert.engine.llm_engine import LLMEngine
from edgert.sampling_params import SamplingParams


@dataclass
class BenchResult:
    label: str
    max_num_seqs: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    ttft_p50: float
    mean_decode_batch: float

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def workload(tokenizer, n: int, mean_len: int, dist: str, seed: int = 0) -> list[list[int]]:
    """n prompts cut from the stdlib's pydoc topics, lengths drawn as `edgert bench --socket`
    draws them (fixed, uniform +-50%, or exponential around the mean)."""
    import random
    from pydoc_data.topics import topics

    from edgert.tools.bench_serve import draw_length

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(draw_length(rng, mean_len, dist), len(ids) - 1)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start:start + length])
    return out


# What `--versus constrained` asks of every 4th request: a JSON array of integers with more
# items than max_tokens can hold, so the constrained requests do the same work as the others
# (a closed array would stop early).
def constraint(max_tokens: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": max_tokens}


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, label: str,
        constrain_every: int = 0) -> BenchResult:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    constrained = params
    if constrain_every:
        import llguidance

        from edgert.serve.guided import JSON_OPTIONS

        constrained = replace(params, grammar=llguidance.LLMatcher.grammar_from_json_schema(
            constraint(max_tokens), defaults=JSON_OPTIONS))
    stats0 = replace(engine.stats)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):  # all arrive at once: the engine's queue does the rest
        engine.add_request(p, constrained if constrain_every and i % constrain_every == 0
                           else params)
    ttfts, out_tokens = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            out_tokens += len(out.token_ids)
            if out.metrics is not None and out.metrics.ttft is not None:
                ttfts.append(out.metrics.ttft)
    seconds = time.perf_counter() - t0
    calls = engine.stats.decode_calls - stats0.decode_calls
    seqs = engine.stats.decode_seqs - stats0.decode_seqs
    return BenchResult(label, engine.config.max_num_seqs, len(prompts),
                       sum(len(p) for p in prompts), out_tokens, seconds,
                       float(np.median(ttfts)), seqs / max(calls, 1))


def main(args: argparse.Namespace, config: EngineConfig) -> int:
    """Run by `edgert bench BUNDLE --offline`; the largest --concurrency level is the batched
    run's max_num_seqs, --output-len the fixed output length."""
    concurrency = max(int(c) for c in str(args.concurrency).split(",") if c.strip())
    versus = getattr(args, "versus", "sequential")
    other_config, other_label = {
        "sequential": (replace(config, max_num_seqs=1), "sequential (max_num_seqs=1)"),
        "one-decode-call": (replace(config, max_num_seqs=concurrency, max_decode_calls=1),
                            "one decode call per step"),
        "constrained": (replace(config, max_num_seqs=concurrency),
                        "batched, 25% constrained (JSON)"),
    }[versus]
    batched = LLMEngine(args.bundle, replace(config, max_num_seqs=concurrency))
    prompts = workload(batched.tokenizer, args.requests, args.prompt_len, args.len_dist,
                       args.seed)
    max_tokens = args.output_len
    batched.warmup()
    # Warm both paths once on a small slice so neither pays first-call costs in the timing.
    run(batched, prompts[:2], 4, "warm")
    label = f"batched (max_num_seqs={concurrency}, up to {config.max_decode_calls} decode calls)"
    results = [run(batched, prompts, max_tokens, label)]
    del batched
    other = LLMEngine(args.bundle, replace(other_config, verify_bundle=False))
    other.warmup()
    run(other, prompts[:1], 4, "warm")
    results.append(run(other, prompts, max_tokens, other_label,
                       constrain_every=4 if versus == "constrained" else 0))
    for r in results:
        print(f"{r.label:<32} {r.requests} requests, {r.prompt_tokens} prompt + "
              f"{r.output_tokens} output tokens in {r.seconds:.1f} s: "
              f"{r.output_tps:.1f} output tok/s, {r.total_tps:.1f} total tok/s, "
              f"TTFT p50 {r.ttft_p50:.2f} s, mean decode batch {r.mean_decode_batch:.1f}")
    ratio = results[0].output_tps / results[1].output_tps
    print(f"ratio {results[0].label} / {results[1].label}, output tokens/s: {ratio:.2f}x")
    if args.json:
        payload = [{**asdict(r), "output_tps": r.output_tps, "total_tps": r.total_tps}
                   for r in results]
        with open(args.json, "w") as f:
            json.dump({"results": payload, "ratio_output_tps": ratio}, f, indent=2)
    return 0
