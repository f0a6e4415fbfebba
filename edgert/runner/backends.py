"""Which backend runs the graph: ONNX Runtime on the CPU (the default, verified everywhere),
ONNX Runtime's CUDA or TensorRT execution provider with a device-resident pool, or TensorRT
itself with the board's plan. Every one owns its pool and honours the same contract
(model_runner.Backend; tests/test_backend_contract.py)."""

from __future__ import annotations

from edgert.bundle import DENSE_PAST, Bundle
from edgert.config import BackendConfig
from edgert.core.shapes import ShapeMenu
from edgert.runner.model_runner import Backend

PROVIDERS = ("cpu", "cuda", "tensorrt", "tensorrt-native")


def unavailable(provider: str) -> str | None:
    """Why `provider` cannot run on this machine, or None when it can."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}"
    if provider == "cpu":
        return None
    if provider == "tensorrt-native":
        from edgert.runner.tensorrt_backend import tensorrt_unavailable

        return tensorrt_unavailable()
    from edgert.runner.ort_gpu_backend import gpu_unavailable

    return gpu_unavailable(provider)


def make_backend(bundle: Bundle, num_blocks: int, block_size: int, config: BackendConfig,
                 menu: ShapeMenu) -> Backend:
    if config.provider not in PROVIDERS:
        raise ValueError(f"unknown provider {config.provider!r}; one of {', '.join(PROVIDERS)}")
    if bundle.convention == DENSE_PAST:
        from edgert.runner.dense_backend import DenseBackend

        return DenseBackend(bundle, num_blocks, block_size, config)  # refuses a GPU provider
    if config.provider == "cpu":
        from edgert.runner.ort_backend import OrtBackend

        return OrtBackend(bundle, num_blocks, block_size, config)
    if config.provider == "tensorrt-native":
        from edgert.runner.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(bundle, num_blocks, block_size, config, menu)
    from edgert.runner.ort_gpu_backend import OrtGpuBackend

    return OrtGpuBackend(bundle, num_blocks, block_size, config, menu)
