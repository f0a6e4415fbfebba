"""Raw graph calls of two bundles, interleaved call by call so both see the same machine:
decode S=1 and S=16 over a 128-token past (--past), a 128-token prefill. Median ms per call and
the ratio second / first. The pairs alternate which bundle runs first (A B, B A, ...), but the
session created second still measured 2-5% faster on a noisy VM (the same bundle twice:
0.97-0.99x): run it both ways, A B and B A, and take the geometric mean. Usage:
scripts/bench_graph.py BUNDLE_A BUNDLE_B [--calls 30] [--past 304]. The calls read the null
block only: the gathers copy B blocks whatever they hold."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgert.bundle import Bundle
from edgert.config import BackendConfig
from edgert.runner.ort_backend import OrtBackend
from edgert.runner.step_inputs import dummy_inputs

BLOCK = 16


def shapes(past: int) -> dict[str, tuple[int, int, int]]:
    b = -(-past // BLOCK)  # blocks the table covers, the new token's slot included
    return {"decode S=1": (1, 1, b), "decode S=16": (16, 1, b),
            "prefill S=1 T=128": (1, 128, 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--past", type=int, default=128,
                    help="tokens a decode attends to, its own included (128: 8 blocks)")
    args = ap.parse_args()
    backends = [OrtBackend(Bundle.load(p, verify=False), 256, BLOCK,
                           BackendConfig(threads=args.threads)) for p in (args.a, args.b)]
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    print("CPU flags:", " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
                                  if f" {f}" in flags))
    for label, shape in shapes(args.past).items():
        label += f" past {args.past}" if label.startswith("decode") else ""
        x, slots = dummy_inputs(shape), np.full(shape[:2], -1, np.int64)
        times: list[list[float]] = [[], []]
        for _ in range(3):
            for be in backends:
                be.run(x, slots)
        for call in range(args.calls):
            for i in (0, 1) if call % 2 == 0 else (1, 0):
                t = time.perf_counter()
                backends[i].run(x, slots)
                times[i].append(time.perf_counter() - t)
        a, b = (statistics.median(t) * 1000 for t in times)
        print(f"{label:27} {a:8.2f} ms  {b:8.2f} ms  ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
