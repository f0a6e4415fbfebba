"""The fit plan (`edgert plan`, `serve --device`, `--kv-memory auto`): its arithmetic holds on
every profile, the pool an engine allocates is the plan's, and a pool that cannot fit is refused
before anything is allocated. Tiny models: no 135M export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import devices
from edgert.bundle import Bundle
from edgert.config import BackendConfig, EngineConfig
from edgert.core.fit_plan import FITS, NO_FIT, SMALLER_POOL, Line, param_count, plan_fit
from edgert.engine.device_fit import plan_for_device
from export.bundle_writer import write_bundle
from export.pipeline import load_source
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    model, ckpt = make_tiny("llama", root / "hf", seed=3)
    return model, Bundle.load(write_bundle(load_source(ckpt), root / "b", progress=False))


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Bundle:
    return tiny_model[1]


def test_param_count_matches_transformers(tiny_model):
    model, bundle = tiny_model
    assert param_count(bundle.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", devices.names())
def test_every_profile_plans_within_its_memory(tiny, name):
    plan = plan_for_device(tiny, EngineConfig(kv_memory=None, block_size=4), name,
                           context=64, concurrency=4, measure=False)
    assert plan.verdict == FITS, plan
    used = sum(x.bytes for x in plan.lines)
    assert used + plan.pool_bytes <= plan.memory_bytes
    block = tiny.config.kv_bytes_per_token(4 if tiny.kv["dtype"] == "float32" else 2) * 4
    assert plan.num_blocks == plan.pool_bytes // block
    assert plan.seqs_at_context == (plan.num_blocks - 1) // 16
    profile = devices.load(name)
    assert ("CUDA context" in [x.what for x in plan.lines]) == (profile.cuda_context_bytes > 0)
    assert (plan.build_peak is not None) == profile.tensorrt


def test_verdicts_on_a_small_board(tiny):
    """A board with room for the weights and little else: the three verdicts, and the
    precision that would fit when this one does not."""
    cfg = tiny.config
    base = devices.load("orin-nano-4gb")
    act = Line("activations", 1 << 20, "estimate")
    params = param_count(cfg)
    kv_seq = cfg.kv_bytes_per_token(4) * (64 + 4)  # one sequence of 64 tokens + null block
    reserve = base.os_reserve_bytes + base.cuda_context_bytes
    # fp32 weights leave no room; the best precision that would is suggested.
    kw = dict(precision="fp32", kv_dtype="float32", block_size=4, activations=act, context=64)
    for per_param, best in ((2.0, "fp16"), (0.6, "int4")):
        memory = reserve + (1 << 20) + int(params * per_param) + kv_seq
        small = dataclasses.replace(base, memory_bytes=memory)
        plan = plan_fit(small, cfg, weights_bytes=params * 4, concurrency=1, **kw)
        assert plan.verdict == NO_FIT and plan.num_blocks == 0 and plan.suggestion == best
    roomy = dataclasses.replace(base, memory_bytes=memory + params * 4 + 4 * kv_seq)
    plan = plan_fit(roomy, cfg, weights_bytes=params * 4, concurrency=1, **kw)
    assert plan.verdict == FITS and plan.seqs_at_context >= 1
    plan = plan_fit(roomy, cfg, weights_bytes=params * 4, concurrency=10_000, **kw)
    assert plan.verdict == SMALLER_POOL and plan.seqs_at_context < 10_000
    plan = plan_fit(roomy, cfg, weights_bytes=params * 4, concurrency=1,
                    kv_request=memory * 2, **kw)
    assert plan.verdict == SMALLER_POOL and plan.pool_bytes < memory * 2


def test_the_engine_allocates_the_plans_pool(tiny):
    """`--kv-memory auto` on a CPU host: the activations are measured by a probe process, and
    the engine's pool is exactly the plan's."""
    from edgert.engine import LLMEngine

    config = EngineConfig(kv_memory=None, kv_fraction=0.01, block_size=4, max_model_len=64,
                          backend=BackendConfig(device_profile="cpu-x86-64"))
    plan = plan_for_device(tiny, config, "cpu-x86-64")
    assert plan.lines[1].source.startswith("measured") and plan.lines[1].bytes > 0
    engine = LLMEngine(tiny, config)
    # MemAvailable moves between the two plans; the pool follows it within a percent.
    assert abs(engine.allocator.num_blocks - plan.num_blocks) <= plan.num_blocks // 100 + 1


def test_a_pool_that_cannot_fit_is_refused_before_allocating(tiny):
    from edgert.engine import LLMEngine

    config = EngineConfig(kv_memory=64 << 30, block_size=4,
                          backend=BackendConfig(device_profile="orin-nano-8gb"))
    with pytest.raises(ValueError, match="does not fit as asked") as e:
        LLMEngine(tiny, config)
    assert "verdict: FITS WITH A SMALLER POOL" in str(e.value)


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgert", "plan", *args], capture_output=True,
                          text=True, timeout=300)


def test_plan_cli(tiny):
    proc = _plan(str(tiny.path), "--device", "all", "--json", "--estimate", "--context", "64")
    assert proc.returncode == 0, proc.stderr
    plans = json.loads(proc.stdout)
    assert sorted(p["device"] for p in plans) == devices.names()
    assert all(p["verdict"] == FITS and p["tokens"] > 0 for p in plans)
    proc = _plan(str(tiny.path), "--device", "orin-nano-8gb", "--kv-memory", "64GiB")
    assert proc.returncode == 3 and "verdict: FITS WITH A SMALLER POOL" in proc.stdout
    assert "estimate for TensorRT" in proc.stdout and "engine build peak" in proc.stdout
    proc = _plan(str(tiny.path), "--device", "no-such-board")
    assert proc.returncode == 1 and "unknown device profile" in proc.stderr
    assert "Traceback" not in proc.stderr
