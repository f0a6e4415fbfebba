"""ONNX Runtime on an NVIDIA GPU: the CUDA execution provider, or ORT's TensorRT execution
provider, with the KV pool resident on the device.

ORT copies a host OrtValue to the device when it is bound, so a host pool could never serve a GPU.
Here the pool is a DevicePool (pycuda, the device's primary context, which ORT's CUDA kernels
share) bound once by pointer; the graph's `new_kv` output is bound to one preallocated device
buffer (sized for the largest call on the shape menu); after each call the pool's own kernel
scatters it into the slots, and copy-on-write copies run on the device too. Only the small index
inputs go up and only the logits come back.

ORT's TensorRT provider gets explicit profile shapes covering the whole shape menu (one profile:
the provider's option strings take min/opt/max per input) and an engine cache directory, so it
builds its engine once, at warm-up, and never again at run time. The native TensorRT backend
(tensorrt_backend.py) builds two profiles instead.

NOT RUN HERE: no GPU on this repository's machines. Written to ORT's documented IO-binding API
(`bind_input(name, 'cuda', id, dtype, shape, ptr)`) and exercised on a GPU by
tests/test_backend_contract.py through scripts/gpu_check.sh.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgert.bundle import Bundle
from edgert.config import BackendConfig
from edgert.core.shapes import ShapeMenu
from edgert.runner.device_pool import DevicePool, cuda_unavailable
from edgert.runner.ort_backend import PROVIDERS, session_options
from edgert.runner.step_inputs import StepInputs, at_least_one_logit

log = logging.getLogger(__name__)


def gpu_unavailable(provider: str) -> str | None:
    """Why `provider` (cuda | tensorrt) cannot run here, or None when it can."""
    if PROVIDERS[provider] not in ort.get_available_providers():
        return (f"the installed onnxruntime does not offer {PROVIDERS[provider]} (install "
                "onnxruntime-gpu, or JetPack's onnxruntime on a Jetson)")
    return cuda_unavailable()


def profile_shapes(menu: ShapeMenu, num_blocks: int, block_size: int, kv_heads: int,
                   head_dim: int, pools: Sequence[str], names: dict[str, str]
                   ) -> dict[str, dict[str, tuple[int, ...]]]:
    """min / opt / max shapes of every input over the whole menu (one profile)."""
    shapes = menu.all()
    s_max = max(s for s, _, _ in shapes)
    t_max = max(t for _, t, _ in shapes)
    b_max = max(b for _, _, b in shapes)
    n_max = max(s * t for s, t, _ in shapes)
    opt_s = min(s_max, 4)
    dims = {
        names["input_ids"]: ((1, 1), (opt_s, 1), (s_max, t_max)),
        names["positions"]: ((1, 1), (opt_s, 1), (s_max, t_max)),
        names["query_lens"]: ((1,), (opt_s,), (s_max,)),
        names["context_lens"]: ((1,), (opt_s,), (s_max,)),
        names["block_tables"]: ((1, 1), (opt_s, 8), (s_max, b_max)),
        names["logits_indices"]: ((1,), (opt_s,), (n_max,)),
    }
    pool = (num_blocks, kv_heads, block_size, head_dim)
    for name in pools:
        dims[name] = (pool, pool, pool)  # fixed: min = opt = max
    return {"min": {k: v[0] for k, v in dims.items()}, "opt": {k: v[1] for k, v in dims.items()},
            "max": {k: v[2] for k, v in dims.items()}}


def _shape_option(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


class OrtGpuBackend:
    def __init__(self, bundle: Bundle, num_blocks: int, block_size: int, config: BackendConfig,
                 menu: ShapeMenu):
        reason = gpu_unavailable(config.provider)
        if reason is not None:
            raise ValueError(f"provider {config.provider!r} cannot run here: {reason}")
        bundle.require_paged(f"provider {config.provider!r}")
        cfg = bundle.config
        self.io = bundle.graph
        self.dtype = np.dtype(bundle.kv["dtype"])
        self.pool = DevicePool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size,
                               num_blocks, self.dtype, device=config.device_id)
        self.device_id = config.device_id
        names = self.io["inputs"]
        pools = [n for pair in self.io["pools"] for n in pair]
        cuda_opts = {"device_id": str(config.device_id)}
        providers: list[tuple[str, dict[str, str]]] = []
        if config.provider == "tensorrt":
            prof = profile_shapes(menu, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  pools, names)
            cache = Path(config.engine_cache or bundle.path / "engines" / "ort-trt-cache")
            cache.mkdir(parents=True, exist_ok=True)
            providers.append((PROVIDERS["tensorrt"], {
                "device_id": str(config.device_id),
                "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": "False",  # strongly typed: precision is in the ONNX
                "trt_profile_min_shapes": _shape_option(prof["min"]),
                "trt_profile_opt_shapes": _shape_option(prof["opt"]),
                "trt_profile_max_shapes": _shape_option(prof["max"]),
            }))
        providers.append((PROVIDERS["cuda"], cuda_opts))
        opts = session_options(config, bundle)
        self.session = ort.InferenceSession(str(bundle.model_path), opts, providers=providers)
        used = self.session.get_providers()
        if used[0] != providers[0][0]:  # never fall back to the CPU silently
            raise RuntimeError(f"onnxruntime fell back from {providers[0][0]} to {used}")
        self._binding = self.session.io_binding()
        pool_shape = [num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim]
        for layer, (kname, vname) in enumerate(self.io["pools"]):
            for name, ptr in ((kname, self.pool.key(layer)), (vname, self.pool.value(layer))):
                self._binding.bind_input(name, "cuda", config.device_id, self.dtype, pool_shape,
                                         ptr)
        import pycuda.driver as cuda

        rows = max(s * t for s, t, _ in menu.all())
        self._kv_row = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
        self._new_kv = cuda.mem_alloc(rows * self._kv_row * self.dtype.itemsize)
        self._kv_shape = (cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
        self._out = self.io["outputs"]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, x: StepInputs, slot_mapping: np.ndarray,
            cow_copies: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """One graph call on the device pool; returns logits [N, vocab] on the host."""
        x, n = at_least_one_logit(x)  # TensorRT's profile starts at N = 1
        self.pool.copy_blocks(cow_copies)
        self.pool.synchronize()  # the graph reads the pool the copies wrote
        names = self.io["inputs"]
        b = self._binding
        for key in ("input_ids", "positions", "query_lens", "context_lens", "block_tables",
                    "logits_indices"):
            b.bind_cpu_input(names[key], np.ascontiguousarray(getattr(x, key), dtype=np.int32))
        s, t = x.input_ids.shape
        layers, two, kvh, d = self._kv_shape
        b.bind_output(self._out["logits"], "cpu")
        b.bind_output(self._out["new_kv"], "cuda", self.device_id, self.dtype,
                      [layers, two, s, t, kvh, d], int(self._new_kv))
        self.session.run_with_iobinding(b)
        b.synchronize_outputs()
        logits = b.get_outputs()[0].numpy()[:n]
        self.pool.write(int(self._new_kv), slot_mapping)
        self.pool.synchronize()  # the next call reads what this wrote
        return logits
