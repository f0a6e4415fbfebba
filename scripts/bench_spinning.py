#!/usr/bin/env python3
"""ORT's three spinning modes (off, step, on; BackendConfig.spinning), side by side in one run:
engine throughput for a 16-request batch (--requests 1: one stream's), and how late an asyncio
event loop in the same process wakes up meanwhile (what the server's loop sees while the engine
thread steps).

    scripts/bench_spinning.py BUNDLE [--requests 16] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from edgert.config import SPINNING, BackendConfig
from edgert.engine import EngineConfig, LLMEngine
from edgert.sampling_params import SamplingParams


def measure(bundle: str, spinning: str, requests: int, max_tokens: int) -> dict[str, float]:
    engine = LLMEngine(bundle, EngineConfig(kv_memory=128 << 20, verify_bundle=False,
                                            backend=BackendConfig(spinning=spinning)))
    engine.warmup()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"Request {i}: write a short story about a robot.", params)
    done = threading.Event()
    tokens = 0

    def run() -> None:
        nonlocal tokens
        while engine.has_unfinished():
            tokens += sum(len(o.token_ids) for o in engine.step())
        done.set()

    async def lag() -> list[float]:
        lags = []
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)
        return lags

    t0 = time.perf_counter()
    worker = threading.Thread(target=run)
    worker.start()
    lags = asyncio.run(lag())
    worker.join()
    seconds = time.perf_counter() - t0
    lags.sort()
    return {"tok_s": tokens / seconds, "lag_p50_ms": statistics.median(lags) * 1000,
            "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()
    res = {spin: measure(a.bundle, spin, a.requests, a.max_tokens) for spin in SPINNING}
    for spin, r in res.items():
        print(f"spinning={spin:<4}  {r['tok_s']:6.1f} output tok/s   event-loop lag "
              f"p50 {r['lag_p50_ms']:6.2f} ms  p99 {r['lag_p99_ms']:6.2f} ms")
    for spin in SPINNING[1:]:
        print(f"spinning {spin} / off: throughput {res[spin]['tok_s'] / res['off']['tok_s']:.2f}x,"
              f" loop lag p99 {res[spin]['lag_p99_ms'] / max(res['off']['lag_p99_ms'], 1e-3):.1f}x")


if __name__ == "__main__":
    main()
