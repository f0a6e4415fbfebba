"""Build a bundle's TensorRT engine on the board it will run on (`edgert build-engine`).

A strongly typed network (the precision of every tensor is the ONNX's own: fp16 activations and
fp16 DQ scales come from the exporter, TensorRT 11 drops the alternative), two optimisation
profiles (decode T = 1; prefill chunks) over the scheduler's shape menu, the pool's num_blocks
fixed (min = opt = max) at the size the device plan gives, a timing cache kept beside the plan so
a rebuild is fast, the builder's workspace bounded from the device profile (an 8 GB Orin Nano
can be OOM-killed by an unbounded build), a progress bar, and the plan written atomically into
`engines/` with its manifest entry.

NOT RUN HERE: TensorRT is not installable on this repository's machines (its PyPI wheels fetch
from NVIDIA's index; on a Jetson it comes from JetPack's apt packages, visible to a venv made with
--system-site-packages). Written to the TensorRT 10 Python API; scripts/gpu_check.sh runs it on a
GPU machine."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from edgert.bundle import Bundle
from edgert.core.shapes import ShapeMenu
from edgert.runner.tensorrt_plan import ENGINES, Profile, plan_name, profiles, record_plan

INSTALL_HINT = ("TensorRT's Python package is not importable here. On a Jetson it comes with "
                "JetPack (apt install python3-libnvinfer python3-libnvinfer-dev) for the system "
                "Python: create the venv with --system-site-packages. PyPI's tensorrt wheels "
                "download from NVIDIA's index and are not Tegra builds.")


class BuildError(RuntimeError):
    pass


def tensorrt_version() -> str:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(INSTALL_HINT) from e
    version = str(trt.__version__)
    if int(version.split(".")[0]) < 10:
        raise BuildError(f"TensorRT {version} is too old: edgert builds strongly typed networks "
                         "with INT4 weights, which need TensorRT 10 (JetPack 6.1 or later)")
    return version


def gpu_compute_capability(device: int = 0) -> str:
    """"8.7" for an Orin, "7.5" for a T4; BuildError when no GPU is visible."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        major, minor = cuda.Device(device).compute_capability()
    except ImportError as e:
        raise BuildError("pycuda is not installed (pip install 'edgert[gpu]')") from e
    except Exception as e:  # no driver or no device
        raise BuildError(f"no CUDA GPU is visible here ({e})") from e
    return f"{major}.{minor}"


def _progress_monitor(trt: Any, report: Callable[[str], None]) -> Any:
    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        """TensorRT's phases as lines ("[3/8] Building engine"), so a long build shows life."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None,
                        num_steps: int) -> None:
            self._steps[phase_name] = num_steps
            report(f"{'  ' if parent_phase else ''}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            total = self._steps.get(phase_name, 0)
            if total and (step + 1 == total or total <= 20):
                report(f"    {phase_name}: {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self._steps.pop(phase_name, None)

    return Monitor()


def build_engine(bundle: Bundle, device: str, menu: ShapeMenu, num_blocks: int,
                 workspace_bytes: int, gpu: int = 0,
                 report: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                 ) -> dict[str, Any]:
    """Build, write and record the plan; returns its manifest entry."""
    version = tensorrt_version()
    sm = gpu_compute_capability(gpu)
    import tensorrt as trt

    cfg = bundle.config
    profs: list[Profile] = profiles(menu, bundle.graph, num_blocks, cfg.num_kv_heads,
                                    cfg.head_dim)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    report(f"parsing {bundle.model_path}")
    if not parser.parse_from_file(str(bundle.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT {version} cannot parse {bundle.model_path}: {errors} "
                         "(`edgert check-trt` lists what the graph breaks)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for prof in profs:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    engines = bundle.path / ENGINES
    engines.mkdir(exist_ok=True)
    name = plan_name(device, version, sm)
    cache_path = engines / (name[: -len(".plan")] + ".timing")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.progress_monitor = _progress_monitor(trt, report)
    report(f"building {name}: {len(profs)} profiles, pool of {num_blocks} blocks, workspace "
           f"{workspace_bytes >> 20} MiB")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT {version} failed to build {name} (see its log above)")
    data = memoryview(plan)
    fd, tmp = tempfile.mkstemp(dir=engines, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, engines / name)
    cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    entry = {
        "file": f"{ENGINES}/{name}", "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "device": device, "tensorrt": version,
        "sm": sm, "num_blocks": num_blocks, "block_size": menu.block_size,
        "max_num_seqs": menu.max_num_seqs, "token_budget": menu.token_budget,
        "max_blocks": menu.max_blocks, "workspace_bytes": workspace_bytes,
        "profiles": {p.name: {k: [list(d) for d in v] for k, v in p.shapes.items()}
                     for p in profs},
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    record_plan(bundle, entry)
    report(f"wrote {engines / name} ({len(data) >> 20} MiB)")
    return entry
