#!/usr/bin/env python3
"""sample() on a batch of 16 rows over SmolLM2's 49152-token vocabulary: wall and CPU time per
call for greedy, plain temperature, top-p and top-k, on Zipf-shaped (language-model-like) and
Gaussian logits, with np.argsort of the same logits for scale. CPU time is the fairer number on
a shared machine. A number to watch, not a gate.

    scripts/bench_sampler.py [--rows 16] [--vocab 49152] [--repeats 5]

(Moved out of the test suite: it printed timings and asserted nothing.)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from edgert.sample.sampler import SamplerRow, sample
from edgert.sampling_params import SamplingParams

CASES: dict[str, dict[str, float]] = {
    "greedy": dict(temperature=0.0),
    "T=1 (no filter)": dict(temperature=1.0),
    "top_p=0.9": dict(temperature=1.0, top_p=0.9),
    "T=0.7 top_p=0.9": dict(temperature=0.7, top_p=0.9),
    "top_k=50": dict(top_k=50),
}


def llm_like(rng: np.random.Generator, n: int, v: int, zipf: float = 1.3) -> np.ndarray:
    """Zipf-shaped logits over a random permutation: a long tail like a language model's."""
    ranks = np.stack([rng.permutation(v) + 1 for _ in range(n)])
    return (-zipf * np.log(ranks) + 0.3 * rng.standard_normal((n, v))).astype(np.float32)


def rows_for(kw: dict[str, float], n: int) -> list[SamplerRow]:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    return [SamplerRow(params, seed=i, step=1, prompt_token_ids=np.zeros(0, np.int32),
                       output_token_ids=np.zeros(0, np.int32)) for i in range(n)]


def timed(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of `repeats` calls, after one untimed call."""
    fn()
    wall = cpu = math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="batch rows (default 16)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (default 5)")
    a = p.parse_args()
    rng = np.random.default_rng(8)
    inputs = {"llm-like": llm_like(rng, a.rows, a.vocab, zipf=1.3),
              "gaussian(sd 2.5)": (2.5 * rng.standard_normal((a.rows, a.vocab))).astype(
                  np.float32)}
    for iname, x in inputs.items():
        for cname, kw in CASES.items():
            rows = rows_for(kw, a.rows)
            wall, cpu = timed(lambda x=x, rows=rows: sample(x, rows), a.repeats)
            print(f"sample() {a.rows} x {a.vocab} {iname:17s} {cname:16s} "
                  f"wall {wall * 1e3:6.2f} ms  cpu {cpu * 1e3:6.2f} ms")
    wall, cpu = timed(lambda: np.argsort(inputs["llm-like"], axis=1), a.repeats)
    print(f"(np.argsort of the same logits: wall {wall * 1e3:.1f} ms, cpu {cpu * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
