#!/usr/bin/env python3
"""KVPool.write at SmolLM2-135M's shape: how long landing one step's new K/V in the host pool
takes (a decode step of 16 sequences, and a 256-token prefill), a number to set against the
graph step, not a gate. Best and median of several repeats, since shared machines are noisy.

    scripts/bench_kv_write.py [--blocks 2000] [--repeats 9] [--shapes 16x1,1x256]

(Moved out of the test suite: it printed timings and asserted nothing.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgert.runner.kv_pool import KVPool

# SmolLM2-135M: 30 layers, 3 KV heads of 64, blocks of 16 tokens
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 3, 64, 16


def shape(text: str) -> tuple[int, int]:
    s, t = text.lower().split("x")
    return int(s), int(t)


def bench(pool: KVPool, seqs: int, tokens: int, repeats: int, inner: int,
          rng: np.random.Generator) -> tuple[float, float, float]:
    """(megabytes written per call, best ms, median ms) of pool.write for [seqs, tokens]."""
    new_kv = rng.standard_normal(
        (pool.num_layers, 2, seqs, tokens, pool.num_kv_heads, pool.head_dim)).astype(np.float32)
    slots = rng.choice(np.arange(pool.block_size, pool.num_blocks * pool.block_size),
                       size=seqs * tokens, replace=False).reshape(seqs, tokens)
    pool.write(new_kv, slots)  # first touch of the pages
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            pool.write(new_kv, slots)
        runs.append((time.perf_counter() - t0) / inner * 1e3)
    runs.sort()
    return new_kv.nbytes / 1e6, runs[0], runs[len(runs) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2000, help="pool size in blocks (default 2000)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats (default 9)")
    p.add_argument("--inner", type=int, default=10, help="writes per repeat (default 10)")
    p.add_argument("--shapes", default="16x1,1x256",
                   help="comma-separated SEQSxTOKENS write shapes (default 16x1,1x256)")
    a = p.parse_args()
    pool = KVPool(LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, a.blocks)
    rng = np.random.default_rng(0)
    for seqs, tokens in (shape(s) for s in a.shapes.split(",")):
        mb, best, median = bench(pool, seqs, tokens, a.repeats, a.inner, rng)
        print(f"KVPool.write S={seqs} T={tokens} ({mb:.2f} MB): best {best:.3f} ms "
              f"({mb / best:.2f} GB/s), median {median:.3f} ms")


if __name__ == "__main__":
    main()
