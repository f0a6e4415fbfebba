"""The backend contract, run by every backend: ONNX Runtime on the CPU, ONNX Runtime's CUDA and
TensorRT execution providers with the pool on the GPU, and TensorRT with a plan built here.

Each backend, on a tiny random Llama bundle: greedy tokens equal the reference runner's (a path
that shares nothing with the engine but the calling convention); batched, chunked, preempted and
prefix-hit runs equal runs alone; n choices; cancellation frees blocks at once; no block leaks;
no shape after warm-up that warm-up did not run. On the CPU every comparison is exact (the graph
is batch-invariant). On a GPU, whose kernels are not, a difference is allowed only at a
teacher-forced near-tie of the reference. Backends this machine cannot run skip with the reason:
none of the GPU ones has run in this repository's CI (no GPU); scripts/gpu_check.sh runs them,
on bundles it prepared (EDGERT_CONTRACT_BUNDLE: the GPU machine has no torch to make them)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgert.bundle import Bundle
from edgert.config import BackendConfig
from edgert.core.scheduler import child_seed
from edgert.engine import LLM, EngineConfig, LLMEngine
from edgert.engine.llm_engine import plan_engine
from edgert.runner.backends import PROVIDERS, unavailable
from edgert.sampling_params import SamplingParams
from tests.paged_runner import PagedRunner

VOCAB = 128  # tests/tiny_models.py's word-level vocabulary

# The device profiles the native backend's plans are built under: a plan fixes the pool's size,
# and the preemption test uses a smaller pool, so it gets a plan of its own (under another
# profile's name; the fit plan checks the tiny pools against each).
DEVICE, SMALL = "t4-16gb", "orin-nano-8gb"
SMALL_POOL = 14 * 2 * 2 * 2 * 4 * 16 * 4  # 14 blocks of 4 tokens of the tiny model, K and V
NEAR_TIE = 1e-3  # teacher-forced top-2 gap (fp32 logits) below which a GPU may pick the other


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Bundle:
    prepared = os.environ.get("EDGERT_CONTRACT_BUNDLE")
    if prepared:
        return Bundle.load(prepared)
    from export.bundle_writer import write_bundle
    from export.pipeline import load_source
    from tests.tiny_models import make_tiny

    root = tmp_path_factory.mktemp("contract")
    _, ckpt = make_tiny("llama", root / "hf", seed=3)
    return Bundle.load(write_bundle(load_source(ckpt), root / "b", progress=False))


def _config(provider: str, device: str = DEVICE, **kw) -> EngineConfig:
    cfg = dict(kv_memory=1 << 20, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
               max_model_len=160, verify_bundle=False,
               backend=BackendConfig(provider=provider, device_profile=device))
    cfg.update(kw)
    return EngineConfig(**cfg)


@pytest.fixture(scope="module", params=PROVIDERS)
def provider(request, tiny_bundle) -> str:
    name = request.param
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}; not verified here")
    if name == "tensorrt-native":  # a plan for each pool the tests below use
        from edgert.runner.tensorrt_build import build_engine

        for device, kw in ((DEVICE, {}), (SMALL, {"kv_memory": SMALL_POOL,
                                                   "max_num_batched_tokens": 8})):
            plan = plan_engine(tiny_bundle, _config(name, device, **kw))
            build_engine(tiny_bundle, device, plan.menu, plan.num_blocks, 256 << 20)
    return name


PROMPTS = [[5, 9, 17, 33, 2 + i, 70] * (i + 1) for i in range(5)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_bundle) -> dict[tuple[int, ...], tuple[list[int], list[np.ndarray]]]:
    runner = PagedRunner(tiny_bundle, block_size=4, num_blocks=64)
    return {tuple(p): runner.greedy(p, 12) for p in PROMPTS}


def _same(provider: str, got: list[int], want: list[int], logits: list[np.ndarray]) -> None:
    """Exact on the CPU; elsewhere the first difference must be a near-tie of the reference."""
    if got == want:
        return
    assert provider != "cpu", f"cpu: {got} != {want}"
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    top = np.sort(logits[k])[-2:]
    assert top[1] - top[0] <= NEAR_TIE, (provider, k, got, want, top)


def test_greedy_equals_the_reference_runner(provider, tiny_bundle, reference):
    llm = LLM(tiny_bundle, _config(provider))
    got = llm.generate(PROMPTS, GREEDY)
    for prompt, completion in zip(PROMPTS, got):
        want, logits = reference[tuple(prompt)]
        _same(provider, completion.token_ids, want, logits)
    assert llm.engine.pool_usage().used == 0


def test_batched_chunked_preempted_and_prefix_hits_equal_alone(provider, tiny_bundle,
                                                               reference):
    rng = np.random.default_rng(0)
    system = [int(t) for t in rng.integers(3, VOCAB, size=22)]
    prompts = [system + [int(t) for t in rng.integers(3, VOCAB, size=n)] for n in (3, 9, 5, 14)]
    alone = {}
    for p in prompts:
        single = LLM(tiny_bundle, _config(provider, enable_prefix_caching=False))
        alone[tuple(p)] = single.generate([p], GREEDY)[0].token_ids
    # 14 blocks of 4 tokens for 4 sequences of ~40: they wait, are preempted and recomputed,
    # and the shared system prompt is served from the prefix cache.
    engine = LLMEngine(tiny_bundle, _config(provider, SMALL, kv_memory=SMALL_POOL,
                                            max_num_batched_tokens=8))
    ids = {engine.add_request(p, GREEDY): tuple(p) for p in prompts}
    got: dict[tuple[int, ...], list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(ids[out.request_id], []).extend(out.token_ids)
    assert engine.stats.preemptions > 0 and engine.allocator.stats.prefix_hit_tokens > 0
    runner = PagedRunner(tiny_bundle, block_size=4, num_blocks=64)
    for p in prompts:
        if got[tuple(p)] != alone[tuple(p)]:
            want, logits = runner.greedy(p, 12)
            _same(provider, got[tuple(p)], want, logits)
    assert engine.pool_usage().used == 0


def test_n_choices(provider, tiny_bundle, reference):
    llm = LLM(tiny_bundle, _config(provider))
    prompt = PROMPTS[1]
    res = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, n=3,
                                                ignore_eos=True))[0]
    want, logits = reference[tuple(prompt)]
    for choice in res.choices:
        _same(provider, choice.token_ids, want, logits)
    if provider == "cpu":  # sampled choices: exact only where the logits are
        params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=3, ignore_eos=True)
        res = llm.generate([prompt], params)[0]
        for i, choice in enumerate(res.choices):
            one = SamplingParams(max_tokens=10, temperature=1.0, seed=child_seed(11, i),
                                 ignore_eos=True)
            assert choice.token_ids == llm.generate([prompt], one)[0].token_ids, i
    assert llm.engine.pool_usage().used == 0


def test_cancellation_frees_blocks_at_once(provider, tiny_bundle):
    engine = LLMEngine(tiny_bundle, _config(provider))
    keep = engine.add_request(PROMPTS[0], GREEDY)
    gone = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=80, temperature=0,
                                                         ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.pool_usage().used > 0
    out = engine.abort(gone)
    assert out[-1].finished and out[-1].finish_reason == "abort"
    while engine.has_unfinished():
        assert all(o.request_id == keep for o in engine.step())
    assert engine.pool_usage().used == 0


def test_no_new_shape_after_warm_up(provider, tiny_bundle):
    engine = LLMEngine(tiny_bundle, _config(provider))
    assert engine.warmup() == len(engine.menu.all())
    engine.runner.seen.clear()
    rng = np.random.default_rng(1)
    for i in range(12):
        engine.add_request([int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(1, 60)))],
                           SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0,
                                          n=1 + i % 3, ignore_eos=True))
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.seen and engine.runner.seen <= engine.runner.warmed, (
        sorted(engine.runner.seen - engine.runner.warmed))
    assert engine.pool_usage().used == 0


def test_unknown_provider_is_a_clear_error(tiny_bundle):
    with pytest.raises(ValueError, match="unknown provider 'npu'"):
        LLM(tiny_bundle, _config("npu"))


@pytest.mark.parametrize("spinning", ["step", "on"])
def test_spinning_modes_change_speed_not_tokens(tiny_bundle, reference, spinning):
    """ORT's worker threads spinning (within a step, or always) is a scheduling choice: the
    same greedy tokens as the reference, and the session really carries the setting."""
    from edgert.runner.ort_backend import session_options

    opts = session_options(BackendConfig(spinning=spinning), tiny_bundle)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    if spinning == "step":  # the workers stop the moment a run returns
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    cfg = _config("cpu")
    cfg.backend = BackendConfig(spinning=spinning, threads=2)
    llm = LLM(tiny_bundle, cfg)
    for prompt, completion in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert completion.token_ids == reference[tuple(prompt)][0]
    with pytest.raises(ValueError, match="spinning must be one of off, step, on"):
        BackendConfig(spinning="yes")
