"""Prompt-lookup speculation at one stream: time per output token with and without, on
repetitive work (quoting a notice, editing code) and on free writing, greedy, runs interleaved
so both see the same machine. Prints TPOT, the ratio with / without, and the acceptance rate.
Usage: scripts/bench_speculative.py BUNDLE [--tokens 96] [--rounds 3] [--k 5]."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from edgert.config import EngineConfig
from edgert.engine.llm_engine import LLMEngine
from edgert.sampling_params import SamplingParams

NOTICE = ("The station opens at six in the morning and closes at midnight. Trains to Leeds "
          "leave from platform four every half hour. Trains to York leave from platform two at "
          "ten past the hour. Bicycles may travel outside the morning peak, in the front "
          "carriage only. Refunds are given at the ticket office, never on the train.")
CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item.price * item.quantity
    total = total + total * tax_rate
    return round(total, 2)
'''
WORKLOADS = {
    "quote a notice": f"Repeat this notice word for word:\n{NOTICE}",
    "edit code": f"Rename the variable total to subtotal in this code and show all of it:\n{CODE}",
    "free writing": "Write a short story about a lighthouse keeper who finds a strange map.",
}


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def one(engine: LLMEngine, prompt: str, tokens: int) -> tuple[float, int]:
    """Seconds per output token after the first, and the tokens produced."""
    engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0))
    first = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            n += len(out.token_ids)
            if first is None and n:
                first, n0 = time.perf_counter(), n
    return (time.perf_counter() - first) / max(n - n0, 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=5, help="speculative tokens (default 5)")
    args = ap.parse_args()
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    print("CPU flags:", " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
                                  if f" {f}" in flags))
    base = EngineConfig(kv_memory=64 << 20, max_model_len=1024, max_num_seqs=1)
    engines = {"plain": LLMEngine(args.bundle, base),
               "speculative": LLMEngine(args.bundle,
                                        replace(base, speculative_tokens=args.k))}
    for e in engines.values():
        e.warmup()
    print(f"{'workload':16} {'plain ms':>9} {'spec ms':>9} {'ratio':>6} {'accepted':>9}")
    for name, text in WORKLOADS.items():
        prompt = chat(text)
        times: dict[str, list[float]] = {k: [] for k in engines}
        spec = engines["speculative"]
        d0, a0 = spec.stats.draft_tokens, spec.stats.accepted_tokens
        outs = {}
        for _ in range(args.rounds):
            for label, e in engines.items():
                tpot, outs[label] = one(e, prompt, args.tokens)
                times[label].append(tpot)
        drafted = spec.stats.draft_tokens - d0
        accepted = spec.stats.accepted_tokens - a0
        p, s = (statistics.median(times[k]) * 1e3 for k in ("plain", "speculative"))
        rate = f"{accepted / drafted:.0%}" if drafted else "-"
        print(f"{name:16} {p:9.2f} {s:9.2f} {s / p:6.2f} {rate:>9}  "
              f"({accepted / args.rounds:.0f} of {outs['speculative']} tokens guessed right)")


if __name__ == "__main__":
    main()
