"""The TensorRT engine's bookkeeping, which runs without TensorRT: plans are named per board and
refused when another TensorRT version or GPU built them; the two profiles cover every shape the
scheduler can form; the build command and the native backend refuse clearly where TensorRT or a
GPU is missing (as on this repository's machines). The build itself needs a GPU: it runs in
scripts/gpu_check.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from edgert.bundle import Bundle
from edgert.config import BackendConfig, EngineConfig
from edgert.engine.llm_engine import plan_engine
from edgert.runner.backends import unavailable
from edgert.runner.tensorrt_plan import (
    PlanError,
    check_plan,
    plan_name,
    profile_for,
    profiles,
    record_plan,
)
from export.bundle_writer import write_bundle
from export.pipeline import load_source
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Bundle:
    root = tmp_path_factory.mktemp("plan")
    _, ckpt = make_tiny("llama", root / "hf", seed=2)
    return Bundle.load(write_bundle(load_source(ckpt), root / "b", progress=False))


def _copy(bundle: Bundle, tmp_path) -> Bundle:
    shutil.copytree(bundle.path, tmp_path / "b")
    return Bundle.load(tmp_path / "b")


def _entry(name: str, device: str, version: str, sm: str, size: int) -> dict:
    return {"file": f"engines/{name}", "bytes": size, "device": device, "tensorrt": version,
            "sm": sm, "num_blocks": 64, "block_size": 4, "built": "2026-12-01T00:00:00+00:00"}


def test_plans_are_named_per_board():
    assert plan_name("orin-nano-8gb", "10.3.0", "8.7") == "orin-nano-8gb-trt10.3.0-sm87.plan"
    assert plan_name("t4-16gb", "10.3.0", "7.5") == "t4-16gb-trt10.3.0-sm75.plan"


def test_a_plan_from_another_tensorrt_or_gpu_is_refused(tiny, tmp_path):
    bundle = _copy(tiny, tmp_path)
    with pytest.raises(PlanError, match="no TensorRT engine for device 'orin-nano-8gb'.*"
                                        "edgert build-engine"):
        check_plan(bundle, "orin-nano-8gb", "10.3.0", "8.7")
    name = plan_name("orin-nano-8gb", "10.0.1", "8.7")
    (bundle.path / "engines").mkdir()
    (bundle.path / "engines" / name).write_bytes(b"x" * 100)
    record_plan(bundle, _entry(name, "orin-nano-8gb", "10.0.1", "8.7", 100))
    bundle = Bundle.load(bundle.path)  # the manifest was rewritten: still a valid bundle
    with pytest.raises(PlanError, match="built for TensorRT 10.0.1, this board has 10.3.0.*"
                                        "edgert build-engine"):
        check_plan(bundle, "orin-nano-8gb", "10.3.0", "8.7")
    with pytest.raises(PlanError, match="compute capability 8.7, this one is 7.2"):
        check_plan(bundle, "orin-nano-8gb", "10.0.1", "7.2")
    assert check_plan(bundle, "orin-nano-8gb", "10.0.1", "8.7")["num_blocks"] == 64
    (bundle.path / "engines" / name).write_bytes(b"x" * 10)  # truncated
    with pytest.raises(PlanError, match="truncated"):
        check_plan(bundle, "orin-nano-8gb", "10.0.1", "8.7")
    assert not list(bundle.path.glob(".manifest.*")), "the manifest is replaced atomically"
    assert json.loads((bundle.path / "manifest.json").read_text())["engines"][name]["sm"] == "8.7"


@pytest.mark.parametrize("kw", [dict(), dict(max_num_seqs=4, max_num_batched_tokens=64),
                                dict(max_decode_calls=1, max_model_len=128)])
def test_two_profiles_cover_every_shape_the_scheduler_forms(tiny, kw):
    plan = plan_engine(tiny, EngineConfig(kv_memory=1 << 20, block_size=4, **kw))
    cfg = tiny.config
    decode, prefill = profiles(plan.menu, tiny.graph, plan.num_blocks, cfg.num_kv_heads,
                               cfg.head_dim)
    assert (decode.name, prefill.name) == ("decode", "prefill")
    names = tiny.graph["inputs"]
    for shape in plan.menu.all():
        s, t, b = shape
        prof = (decode, prefill)[profile_for(shape)]
        assert prof.covers({names["input_ids"]: (s, t), names["positions"]: (s, t),
                            names["query_lens"]: (s,), names["context_lens"]: (s,),
                            names["block_tables"]: (s, b), names["logits_indices"]: (s * t,)}), (
            shape, prof.name)
    pool = (plan.num_blocks, cfg.num_kv_heads, 4, cfg.head_dim)
    for prof in (decode, prefill):
        for pair in tiny.graph["pools"]:
            for name in pair:
                assert prof.shapes[name] == (pool, pool, pool)  # min = opt = max
        for lo, opt, hi in prof.shapes.values():
            assert all(a <= o <= c for a, o, c in zip(lo, opt, hi))
    assert decode.shapes[names["input_ids"]][2][1] == 1  # decode is T = 1 only
    assert prefill.shapes[names["input_ids"]][0][1] == 2


def test_build_engine_refuses_clearly_without_tensorrt(tiny, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgert", "build-engine", *args],
                              capture_output=True, text=True, timeout=120)

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        proc = run(str(tiny.path), "--device", "orin-nano-8gb", "--kv-memory", "1MiB",
                   "--block-size", "4")
        assert proc.returncode == 1 and "TensorRT's Python package is not importable" in (
            proc.stderr) and "--system-site-packages" in proc.stderr, proc.stderr
    else:
        pytest.skip("TensorRT is installed here: the GPU check builds for real")
    proc = run(str(tiny.path))
    assert proc.returncode == 2 and "--device PROFILE is required" in proc.stderr
    proc = run(str(tiny.path), "--device", "cpu-x86-64")
    assert proc.returncode == 2 and "has no TensorRT" in proc.stderr


def test_gpu_providers_refuse_clearly_where_they_cannot_run(tiny):
    """On a machine without them (this repository's), each GPU provider says why, and the
    engine refuses to start on it instead of falling back to the CPU."""
    from edgert.engine import LLMEngine

    for provider in ("cuda", "tensorrt", "tensorrt-native"):
        reason = unavailable(provider)
        if reason is None:
            continue  # a GPU machine: the contract suite runs it
        with pytest.raises(ValueError, match=f"provider '{provider}' cannot run here"):
            LLMEngine(tiny, EngineConfig(kv_memory=1 << 20, block_size=4,
                                         backend=BackendConfig(provider=provider)))
    assert unavailable("npu").startswith("unknown provider")


def test_build_engine_refuses_tensorrt_8(tiny, tmp_path):
    """JetPack 6.0's TensorRT 8.6 has no INT4 and no strongly typed networks. TensorRT cannot
    be installed here, so a module that only reports that version stands in for it."""
    (tmp_path / "tensorrt.py").write_text('__version__ = "8.6.2"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "edgert", "build-engine", str(tiny.path), "--device",
         "orin-nano-8gb", "--kv-memory", "1MiB", "--block-size", "4"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert proc.returncode == 1 and "TensorRT 8.6.2 is too old" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
