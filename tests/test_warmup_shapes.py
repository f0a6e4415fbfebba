"""After warm-up no new (S, T, B) shape reaches the backend, whatever the workload: warm-up runs
exactly the scheduler's shape menu, and every call the scheduler forms is on it (so ORT's arena
stops growing, and a GPU backend could capture one graph per shape). A tiny random model keeps
this in the fast tier: the shapes do not depend on the weights."""

from __future__ import annotations

import contextlib
import random

import pytest

from edgert.bundle import Bundle
from edgert.core.scheduler import RequestRejected
from edgert.engine import EngineConfig, LLMEngine
from edgert.sampling_params import SamplingParams
from export.bundle_writer import write_bundle
from export.pipeline import load_source
from tests.tiny_models import VOCAB, make_tiny


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Bundle:
    root = tmp_path_factory.mktemp("shapes")
    _, ckpt = make_tiny("llama", root / "hf", seed=5)
    return Bundle.load(write_bundle(load_source(ckpt), root / "b", progress=False))


def _workload(engine: LLMEngine, rng: random.Random, requests: int) -> None:
    """Staggered arrivals of mixed lengths with shared prefixes, n > 1, prompt logprobs and
    aborts, on a pool too small for all of it at once."""
    systems = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (9, 30, 61)]
    pending = []
    for i in range(requests):
        prompt = rng.choice(systems)[: rng.randint(0, 61)] + [
            rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=rng.choice([0, 1]),
                                seed=i, n=rng.choice([1, 1, 1, 2, 3]), ignore_eos=True,
                                prompt_logprobs=1 if i % 9 == 0 else None)
        pending.append((prompt, params))
    step, live = 0, []

    def add(prompt: list[int], params: SamplingParams) -> None:
        # n choices too long for the small pool are refused at once
        with contextlib.suppress(RequestRejected):
            live.append(engine.add_request(prompt, params))

    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            add(*pending.pop())
        if step % 23 == 0:  # a burst of short prompts, prefilled together
            for _ in range(4):
                add([rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 7))],
                    SamplingParams(max_tokens=5, temperature=0))
        if live and step % 17 == 5:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
        step += 1


def test_no_shape_reaches_the_backend_that_warm_up_did_not_run(tiny_bundle):
    block = 2 * 2 * 2 * 4 * 16 * 4  # layers x K,V x kv heads x block of 4 x head_dim x fp32
    engine = LLMEngine(tiny_bundle, EngineConfig(
        kv_memory=31 * block, block_size=4, max_num_seqs=6, max_num_batched_tokens=32,
        max_model_len=200, verify_bundle=False))
    assert engine.block_bytes == block and engine.pool_usage().total == 30
    shapes = engine.menu.all()
    assert engine.warmup() == len(shapes) == len(set(shapes))
    warmed = set(engine.runner.warmed)
    engine.runner.seen.clear()
    _workload(engine, random.Random(2), requests=60)
    seen = engine.runner.seen
    assert seen <= warmed, f"shapes that reached the backend unwarmed: {sorted(seen - warmed)}"
    assert {s for s in seen if s[1] == 1} and {s for s in seen if s[1] > 1 and s[0] > 1}, seen
    assert len(seen) >= 12, f"the workload should be varied, saw only {sorted(seen)}"
    assert engine.stats.preemptions > 0 and engine.allocator.stats.prefix_hit_tokens > 0
    assert engine.pool_usage().used == 0 and not engine.has_unfinished()
    print(f"{len(seen)} of {len(warmed)} warmed shapes used; "
          f"{engine.stats.preemptions} preemptions")
