"""The backend contract, shared by every execution provider: the engine's greedy output through
the backend equals the reference runner's on the same bundle. Providers this machine lacks (no
GPU here) are skipped with the reason; nothing GPU-side is claimed as run."""

from __future__ import annotations

import pytest

from edgert.bundle import Bundle
from edgert.config import BackendConfig
from edgert.engine import LLM, EngineConfig
from edgert.runner.ort_backend import available_providers
from edgert.sampling_params import SamplingParams
from export.bundle_writer import write_bundle
from export.pipeline import load_source
from tests.paged_runner import PagedRunner
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    _, ckpt = make_tiny("llama", root / "hf", seed=3)
    return Bundle.load(write_bundle(load_source(ckpt), root / "b", progress=False))


@pytest.mark.parametrize("provider", ["cpu", "cuda", "tensorrt"])
def test_backend_contract(provider, tiny_bundle):
    if provider not in available_providers():
        pytest.skip(f"{provider}: the installed onnxruntime does not offer this provider "
                    f"(no GPU on this machine); not verified here")
    prompts = [[5, 9, 17, 33, 2 + i, 70] * (i + 1) for i in range(5)]
    want = [PagedRunner(tiny_bundle, block_size=4, num_blocks=64).greedy(p, 12)[0]
            for p in prompts]
    llm = LLM(tiny_bundle, EngineConfig(kv_memory=1 << 20, block_size=4,
                                        backend=BackendConfig(provider=provider)))
    got = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in got] == want
    assert llm.engine.pool_usage().used == 0


def test_unknown_or_missing_provider_is_a_clear_error(tiny_bundle):
    with pytest.raises(ValueError, match="unknown provider"):
        LLM(tiny_bundle, EngineConfig(kv_memory=1 << 20, backend=BackendConfig(provider="npu")))
    missing = next((p for p in ("cuda", "tensorrt") if p not in available_providers()), None)
    if missing is None:
        pytest.skip("every provider is available here")
    with pytest.raises(ValueError, match="not offered by the installed onnxruntime"):
        LLM(tiny_bundle, EngineConfig(kv_memory=1 << 20,
                                      backend=BackendConfig(provider=missing)))
