"""The native TensorRT backend (`--provider tensorrt-native`): the board's plan, one execution
context, the KV pool resident on the device.

- The plan is checked against this board (TensorRT version, GPU) before TensorRT sees it, and
  deserialised from a memory map of the file, so it is never held twice in host memory.
- One context with two optimisation profiles (decode T = 1; prefill chunks), switched only when
  the call kind changes. They share the context's activation memory.
- Every buffer is preallocated for the largest shape on the menu and its address set once
  (`set_tensor_address` persists, 256-byte aligned); a call only sets the input shapes, copies
  the small index inputs through pinned host buffers, runs, scatters `new_kv` into the pool with
  the pool's kernel on the same stream (so no synchronisation between them), and brings back
  the logits. The graph's `new_kv` is a separate output and the pool an input: TensorRT gives
  wrong results when one buffer is both.
- CUDA graphs for decode are not used yet.

NOT RUN HERE: no GPU and no TensorRT on this repository's machines. Written to the TensorRT 10
Python API (name-based tensors, execute_async_v3); scripts/gpu_check.sh runs
tests/test_backend_contract.py through it on a GPU machine.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

from edgert.bundle import Bundle
from edgert.config import BackendConfig
from edgert.core.shapes import ShapeMenu
from edgert.runner.device_pool import DevicePool, cuda_unavailable
from edgert.runner.step_inputs import StepInputs, at_least_one_logit
from edgert.runner.tensorrt_plan import PlanError, check_plan, profile_for, profiles

_INDEX = ("input_ids", "positions", "query_lens", "context_lens", "block_tables",
          "logits_indices")


def tensorrt_unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT's Python package is not installed (JetPack's, on a Jetson)"
    return cuda_unavailable()


class TensorRTBackend:
    def __init__(self, bundle: Bundle, num_blocks: int, block_size: int, config: BackendConfig,
                 menu: ShapeMenu):
        reason = tensorrt_unavailable()
        if reason is not None:
            raise ValueError(f"provider 'tensorrt-native' cannot run here: {reason}")
        bundle.require_paged("provider 'tensorrt-native'")
        if not config.device_profile:
            raise ValueError("provider 'tensorrt-native' needs --device PROFILE: the engine is "
                             "built for one device profile (edgert build-engine)")
        import pycuda.driver as cuda
        import tensorrt as trt

        from edgert.runner.tensorrt_build import gpu_compute_capability

        sm = gpu_compute_capability(config.device_id)
        entry = check_plan(bundle, config.device_profile, str(trt.__version__), sm)
        if entry["num_blocks"] != num_blocks or entry["block_size"] != block_size:
            raise PlanError(
                f"the engine was built for a pool of {entry['num_blocks']} blocks of "
                f"{entry['block_size']} tokens, this engine configuration plans "
                f"{num_blocks} of {block_size}: serve with the same --device and --kv-memory "
                "as the build, or rebuild")
        cfg = bundle.config
        self.io = bundle.graph
        self.dtype = np.dtype(bundle.kv["dtype"])
        self.pool = DevicePool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size,
                               num_blocks, self.dtype, device=config.device_id)
        self.stream = self.pool.stream
        self._profiles = profiles(menu, self.io, num_blocks, cfg.num_kv_heads, cfg.head_dim)
        for shape in menu.all():
            prof = self._profiles[profile_for(shape)]
            s, t, b = shape
            names = self.io["inputs"]
            if not prof.covers({names["input_ids"]: (s, t), names["block_tables"]: (s, b),
                                names["logits_indices"]: (s * t,)}):
                raise PlanError(f"call shape {shape} of this configuration is outside the "
                                f"engine's {prof.name} profile: rebuild with the same "
                                "--max-num-seqs / --max-num-batched-tokens / --max-model-len")
        with self.pool.current():
            self._load(bundle, entry, menu, cfg, cuda, trt)

    def _load(self, bundle, entry, menu, cfg, cuda, trt) -> None:  # type: ignore[no-untyped-def]
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        with open(bundle.path / entry["file"], "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise PlanError(f"TensorRT could not deserialise {entry['file']}; rebuild it")
        self.context = self.engine.create_execution_context()
        # Buffers for the largest call on the menu; addresses set once.
        shapes = menu.all()
        s_max = max(s for s, _, _ in shapes)
        rows = max(s * t for s, t, _ in shapes)
        b_max = max(b for _, _, b in shapes)
        sizes = {"input_ids": rows, "positions": rows, "query_lens": s_max,
                 "context_lens": s_max, "block_tables": s_max * b_max, "logits_indices": rows}
        self._host = {k: cuda.pagelocked_empty(n, np.int32) for k, n in sizes.items()}
        self._dev = {k: cuda.mem_alloc(n * 4) for k, n in sizes.items()}
        names = self.io["inputs"]
        for key in _INDEX:
            self.context.set_tensor_address(names[key], int(self._dev[key]))
        for layer, (kname, vname) in enumerate(self.io["pools"]):
            self.context.set_tensor_address(kname, self.pool.key(layer))
            self.context.set_tensor_address(vname, self.pool.value(layer))
        vocab = cfg.vocab_size
        self._logits_host = cuda.pagelocked_empty((rows, vocab), np.float32)
        self._logits_dev = cuda.mem_alloc(rows * vocab * 4)
        self._new_kv = cuda.mem_alloc(rows * cfg.num_layers * 2 * cfg.num_kv_heads
                                      * cfg.head_dim * self.dtype.itemsize)
        out = self.io["outputs"]
        self.context.set_tensor_address(out["logits"], int(self._logits_dev))
        self.context.set_tensor_address(out["new_kv"], int(self._new_kv))
        self._active = -1
        self._cuda = cuda

    @property
    def provider(self) -> str:
        return "tensorrt-native"

    def run(self, x: StepInputs, slot_mapping: np.ndarray,
            cow_copies: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        with self.pool.current():  # the engine loop's thread, not the one that loaded us
            return self._run(x, slot_mapping, cow_copies)

    def _run(self, x: StepInputs, slot_mapping: np.ndarray,
             cow_copies: Sequence[tuple[int, int]]) -> np.ndarray:
        cuda, ctx, names = self._cuda, self.context, self.io["inputs"]
        x, n = at_least_one_logit(x)  # the profiles start at N = 1
        self.pool.copy_blocks(cow_copies)  # on the same stream, before the graph reads
        profile = profile_for(x.shape)
        if profile != self._active:
            ctx.set_optimization_profile_async(profile, self.stream.handle)
            self._active = profile
        for key in _INDEX:
            value = np.ascontiguousarray(getattr(x, key), dtype=np.int32)
            host = self._host[key][: value.size]
            host[:] = value.reshape(-1)
            cuda.memcpy_htod_async(self._dev[key], host, self.stream)
            ctx.set_input_shape(names[key], value.shape)
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"TensorRT failed to run a call of shape {x.shape}")
        self.pool.write(int(self._new_kv), slot_mapping)
        rows = self._logits_host[: x.logits_indices.size]
        cuda.memcpy_dtoh_async(rows, int(self._logits_dev), self.stream)
        self.stream.synchronize()
        return np.array(rows[:n])
