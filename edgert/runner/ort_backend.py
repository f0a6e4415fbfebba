"""ONNX Runtime backend on the CPU: one session, and the KV pool it computes on.

The backend owns the pool (the engine never sees where it lives): a host numpy array whose
per-layer views are bound zero-copy once, at start, through IO binding, so a step binds only the
small index inputs. `run` applies the step's copy-on-write block copies, runs the graph and
scatters the returned new K/V into the pool; only logits come back.

A host pool can never serve a GPU provider (ORT copies a host OrtValue to the device when it is
bound, and the graph would read that stale copy forever): the CUDA and TensorRT providers run in
ort_gpu_backend.py, on a device-resident pool."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edgert.bundle import Bundle
from edgert.config import BackendConfig
from edgert.runner.kv_pool import KVPool
from edgert.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_providers() -> list[str]:
    return [k for k, v in PROVIDERS.items() if v in ort.get_available_providers()]


def session_options(config: BackendConfig, bundle: Bundle) -> ort.SessionOptions:
    """ORT settings for running a bundle: threads, spinning, optimisation level, plus the
    settings the exporter found the bundle needs (e.g. portable int8 bundles turn off ORT's
    Q/DQ -> integer-kernel fusion, whose int16 sums overflow on AVX2 CPUs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[config.optimization]
    spin = "0" if config.spinning == "off" else "1"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if config.spinning == "step":  # the workers stop spinning the moment a run returns
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    for key, value in (bundle.graph.get("ort_session_config") or {}).items():
        opts.add_session_config_entry(key, str(value))
    return opts


class OrtBackend:
    def __init__(self, bundle: Bundle, num_blocks: int, block_size: int,
                 config: BackendConfig | None = None):
        self.config = config = config or BackendConfig()
        if config.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {config.provider!r}; one of {sorted(PROVIDERS)}")
        if config.provider not in available_providers():
            raise ValueError(
                f"provider {config.provider!r} is not offered by the installed onnxruntime "
                f"(it has: {', '.join(available_providers())}); install onnxruntime-gpu")
        if config.provider != "cpu":
            raise ValueError(f"OrtBackend runs the CPU provider, not {config.provider!r} "
                             "(runner/backends.py picks the backend)")
        bundle.require_paged("OrtBackend")
        cfg = bundle.config
        self.pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size,
                           num_blocks, np.dtype(bundle.kv["dtype"]))
        opts = session_options(config, bundle)
        self.session = ort.InferenceSession(str(bundle.model_path), opts,
                                            providers=[PROVIDERS[config.provider]])
        self.io = bundle.graph
        self._binding = self.session.io_binding()
        # Keep the OrtValues alive: they borrow the pool's memory.
        self._pool_values = []
        for layer, (kname, vname) in enumerate(self.io["pools"]):
            for name, view in ((kname, self.pool.key(layer)), (vname, self.pool.value(layer))):
                value = ort.OrtValue.ortvalue_from_numpy(view)
                self._binding.bind_ortvalue_input(name, value)
                self._pool_values.append(value)
        self._out = self.io["outputs"]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, x: StepInputs, slot_mapping: np.ndarray,
            cow_copies: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """One graph call on the pool; returns logits [N, vocab] on the host."""
        self.pool.copy_blocks(cow_copies)
        names = self.io["inputs"]
        b = self._binding
        for key in ("input_ids", "positions", "query_lens", "context_lens", "block_tables",
                    "logits_indices"):
            b.bind_cpu_input(names[key], np.ascontiguousarray(getattr(x, key), dtype=np.int32))
        b.bind_output(self._out["logits"], "cpu")
        b.bind_output(self._out["new_kv"], "cpu")
        self.session.run_with_iobinding(b)
        logits, new_kv = b.get_outputs()
        self.pool.write(new_kv.numpy(), slot_mapping)
        return logits.numpy()
