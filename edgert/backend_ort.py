"""ONNX Runtime backend: one session, the KV pool bound zero-copy through IO binding.

On the CPU provider the per-layer pool views are wrapped as OrtValues over the numpy memory once,
at start; each step binds only the small index inputs. The CUDA and TensorRT execution providers
are selected by configuration when the installed onnxruntime offers them; with those the pool
still lives in host memory and is copied to the device per step. That path is written against
ORT's documented API but has NOT been run on a GPU in this repository (no GPU here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgert.bundle import Bundle
from edgert.kv_pool import KVPool
from edgert.step_inputs import StepInputs

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass
class BackendConfig:
    provider: str = "cpu"  # cpu | cuda | tensorrt
    threads: int = 0  # intra-op threads; 0 = one per physical core (ORT's default)
    # Spinning worker threads burn the cores between ops; on a 2-core board they starve the
    # server's event loop and the tokenizer, so it is off by default (see `edgert bench`).
    allow_spinning: bool = False
    optimization: str = "all"  # basic | extended | all


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
    spin = "1" if config.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    for key, value in (bundle.graph.get("ort_session_config") or {}).items():
        opts.add_session_config_entry(key, str(value))
    return opts


class OrtBackend:
    def __init__(self, bundle: Bundle, pool: KVPool, config: BackendConfig | None = None):
        self.config = config = config or BackendConfig()
        if config.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {config.provider!r}; one of {sorted(PROVIDERS)}")
        if config.provider not in available_providers():
            raise ValueError(
                f"provider {config.provider!r} is not offered by the installed onnxruntime "
                f"(it has: {', '.join(available_providers())}); install onnxruntime-gpu")
        opts = session_options(config, bundle)
        providers = [PROVIDERS[config.provider]]
        if config.provider != "cpu":
            providers.append(PROVIDERS["cpu"])
        self.session = ort.InferenceSession(str(bundle.model_path), opts, providers=providers)
        self.io = bundle.graph
        self.pool = pool
        self._binding = self.session.io_binding()
        # Keep the OrtValues alive: they borrow the pool's memory.
        self._pool_values = []
        for layer, (kname, vname) in enumerate(self.io["pools"]):
            for name, view in ((kname, pool.key(layer)), (vname, pool.value(layer))):
                value = ort.OrtValue.ortvalue_from_numpy(view)
                self._binding.bind_ortvalue_input(name, value)
                self._pool_values.append(value)
        self._out = self.io["outputs"]

    def run(self, x: StepInputs) -> tuple[np.ndarray, np.ndarray]:
        """One graph call; returns logits [N, vocab] and the new K/V [L, 2, S, T, kvh, d]."""
        names = self.io["inputs"]
        b = self._binding
        for key in ("input_ids", "positions", "query_lens", "context_lens", "block_tables",
                    "logits_indices"):
            b.bind_cpu_input(names[key], np.ascontiguousarray(getattr(x, key), dtype=np.int32))
        b.bind_output(self._out["logits"], "cpu")
        b.bind_output(self._out["new_kv"], "cpu")
        self.session.run_with_iobinding(b)
        logits, new_kv = b.get_outputs()
        return logits.numpy(), new_kv.numpy()
