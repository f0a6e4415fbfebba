"""`edgert bench BUNDLE --offline`: the engine's throughput with continuous batching against the
same workload through the same engine one sequence at a time (max_num_seqs=1), run side by side
in one process so the ratio is measured under identical conditions.

Prompts are slices of the stdlib's pydoc topics (plain English every Python has); every request
decodes a fixed number of tokens (ignore_eos) so both runs do exactly the same work."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from edgert.engine import EngineConfig, LLMEngine
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


def workload(tokenizer, n: int, prompt_len: tuple[int, int], seed: int = 0) -> list[list[int]]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        start = int(rng.integers(0, len(ids) - length))
        out.append(ids[start:start + length])
    return out


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, label: str
        ) -> BenchResult:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stats0 = replace(engine.stats)
    t0 = time.perf_counter()
    for p in prompts:  # all arrive at once: the engine's queue does the rest
        engine.add_request(p, params)
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
    batched = LLMEngine(args.bundle, replace(config, max_num_seqs=args.concurrency))
    prompts = workload(batched.tokenizer, args.requests,
                       (args.prompt_len_min, args.prompt_len_max))
    batched.warmup()
    # Warm both paths once on a small slice so neither pays first-call costs in the timing.
    run(batched, prompts[:2], 4, "warm")
    results = [run(batched, prompts, args.max_tokens, f"batched (max_num_seqs={args.concurrency})")]
    del batched
    single = LLMEngine(args.bundle, replace(config, max_num_seqs=1, verify_bundle=False))
    run(single, prompts[:1], 4, "warm")
    results.append(run(single, prompts, args.max_tokens, "sequential (max_num_seqs=1)"))
    for r in results:
        print(f"{r.label:<32} {r.requests} requests, {r.prompt_tokens} prompt + "
              f"{r.output_tokens} output tokens in {r.seconds:.1f} s: "
              f"{r.output_tps:.1f} output tok/s, {r.total_tps:.1f} total tok/s, "
              f"TTFT p50 {r.ttft_p50:.2f} s, mean decode batch {r.mean_decode_batch:.1f}")
    ratio = results[0].output_tps / results[1].output_tps
    print(f"ratio batched / sequential, output tokens/s: {ratio:.2f}x")
    if args.json:
        payload = [{**asdict(r), "output_tps": r.output_tps, "total_tps": r.total_tps}
                   for r in results]
        with open(args.json, "w") as f:
            json.dump({"results": payload, "ratio_output_tps": ratio}, f, indent=2)
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offline benchmark (--offline)")
    g.add_argument("--requests", type=int, default=32, help="number of prompts (32)")
    g.add_argument("--concurrency", type=int, default=16,
                   help="max_num_seqs of the batched run (16)")
    g.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (64)")
    g.add_argument("--prompt-len-min", type=int, default=16)
    g.add_argument("--prompt-len-max", type=int, default=128)
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
