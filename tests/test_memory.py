"""Memory stays flat: after warm-up, 500 requests of varied lengths leave the process's resident
memory within +5% (the pool is preallocated; bucketed shapes stop ORT's arena from growing)."""

from __future__ import annotations

import numpy as np

from edgert.engine import EngineConfig, LLMEngine
from edgert.sampling_params import SamplingParams


def rss_bytes(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def _serve(engine: LLMEngine, n: int, rng: np.random.Generator) -> None:
    vocab_lo, vocab_hi = 100, 40000
    pending = n
    while pending or engine.has_unfinished():
        while pending and engine.num_requests < 24:
            plen = int(rng.integers(1, 64))
            params = SamplingParams(max_tokens=int(rng.integers(1, 8)),
                                    temperature=float(rng.choice([0.0, 0.8])),
                                    seed=int(rng.integers(0, 2**31)), ignore_eos=True)
            engine.add_request(rng.integers(vocab_lo, vocab_hi, plen).tolist(), params)
            pending -= 1
        engine.step()


def test_resident_memory_flat_over_500_requests(smollm2_bundle):
    engine = LLMEngine(smollm2_bundle, EngineConfig(
        kv_memory=96 << 20, max_num_seqs=16, max_num_batched_tokens=256, verify_bundle=False))
    engine.warmup()
    rng = np.random.default_rng(0)
    _serve(engine, 40, rng)  # warm-up traffic
    before = rss_bytes()
    _serve(engine, 500, rng)
    after = rss_bytes()
    growth = after / before - 1
    print(f"RSS after warm-up {before / 2**20:.0f} MiB, after 500 requests "
          f"{after / 2**20:.0f} MiB ({growth:+.1%}); steps {engine.stats.steps}, "
          f"preemptions {engine.stats.preemptions}")
    assert growth <= 0.05
    assert engine.pool_usage().used == 0
