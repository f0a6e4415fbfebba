"""The KV pool in GPU memory, for the CUDA and TensorRT backends: one zero-initialised device
buffer [layers, 2, num_blocks, kv_heads, block_size, head_dim], sized once and never grown, plus
the two small kernels the host pool does with numpy: scatter a call's `new_kv` into its slots,
and copy blocks for copy-on-write. Nothing of the pool ever crosses the bus; only the slot
mapping and the copy pairs go up each step.

pycuda is the CUDA binding (`pip install pycuda` builds against the local CUDA; on a Jetson,
JetPack's). It works in the device's PRIMARY context, the one ONNX Runtime and TensorRT use
through the CUDA runtime API, so a pointer allocated here is valid in their kernels; every call
makes that context current first (`current()`), because the engine loop runs on another thread
than the one that built the pool. The kernels are compiled once by pycuda's SourceModule (nvcc,
cached under ~/.cache/pycuda).

NOT RUN HERE: this repository's machines have no GPU. It is written to pycuda's documented API
and exercised by tests/test_backend_contract.py on a machine that has one (scripts/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

_KERNELS = r"""
// new_kv [L2, n, kvh, d] (n = S*T rows of this call) -> pool [L2, nb, kvh, bs, d] at slots[n]
// (-1: padding, not written). Elements are copied as raw words: any 2- or 4-byte dtype.
template <typename W>
__device__ void scatter(const W* __restrict__ src, W* __restrict__ pool,
                        const long long* __restrict__ slots, long long n, int l2, int kvh,
                        int bs, int d, long long nb) {
    long long total = (long long)l2 * n * kvh * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int e = i % d;
        long long r = i / d;
        int h = r % kvh;
        r /= kvh;
        long long tok = r % n;
        int plane = r / n;
        long long slot = slots[tok];
        if (slot < 0) continue;
        long long blk = slot / bs, off = slot % bs;
        pool[(((plane * nb + blk) * kvh + h) * bs + off) * d + e] = src[i];
    }
}
extern "C" __global__ void scatter32(const unsigned int* src, unsigned int* pool,
                                     const long long* slots, long long n, int l2, int kvh,
                                     int bs, int d, long long nb) {
    scatter<unsigned int>(src, pool, slots, n, l2, kvh, bs, d, nb);
}
extern "C" __global__ void scatter16(const unsigned short* src, unsigned short* pool,
                                     const long long* slots, long long n, int l2, int kvh,
                                     int bs, int d, long long nb) {
    scatter<unsigned short>(src, pool, slots, n, l2, kvh, bs, d, nb);
}
// pool [L2, nb, block_words] : block dst[k] = block src[k] in every plane (no chains: the
// destinations of copy-on-write are fresh blocks, never a source in the same step).
extern "C" __global__ void copy_blocks(unsigned int* pool, const long long* pairs, int n_pairs,
                                       int l2, long long nb, long long block_words) {
    long long total = (long long)l2 * n_pairs * block_words;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long w = i % block_words;
        long long r = i / block_words;
        int p = r % n_pairs;
        int plane = r / n_pairs;
        long long src = pairs[2 * p], dst = pairs[2 * p + 1];
        pool[(plane * nb + dst) * block_words + w] = pool[(plane * nb + src) * block_words + w];
    }
}
"""


def cuda_unavailable() -> str | None:
    """Why pycuda cannot reach a GPU here (not installed, no driver, no device), or None."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return "pycuda is not installed (pip install 'edgert[gpu]')"
    try:
        cuda.init()
        if cuda.Device.count() > 0:
            return None
    except Exception as e:  # no driver
        return f"no CUDA driver is usable ({e})"
    return "no CUDA device is visible"


class DevicePool:
    """The device-resident pool. `key(layer)` / `value(layer)` are device pointers to the
    contiguous [num_blocks, kv_heads, block_size, head_dim] planes the graph binds; `write` and
    `copy_blocks` run on `stream` (a pycuda Stream) so they order with the graph's work."""

    THREADS = 256

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, dtype: Any = np.float32, device: int = 0):
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule

        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._cuda = cuda
        with self.current():
            self._allocate(num_layers, num_kv_heads, head_dim, block_size, num_blocks, dtype,
                           SourceModule)

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """The device's primary context, current on this thread for the block."""
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _allocate(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                  num_blocks: int, dtype: Any, SourceModule: Any) -> None:  # noqa: N803
        cuda = self._cuda
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.dtype = np.dtype(dtype)
        if self.dtype.itemsize not in (2, 4):
            raise ValueError(f"a device pool holds 2- or 4-byte elements, not {self.dtype}")
        self.plane_bytes = num_blocks * num_kv_heads * block_size * head_dim * self.dtype.itemsize
        self.nbytes = num_layers * 2 * self.plane_bytes
        self.buffer = cuda.mem_alloc(self.nbytes)  # 256-byte aligned, as TensorRT requires
        cuda.memset_d8(self.buffer, 0, self.nbytes)  # block 0, the null block, stays zero
        self.stream = cuda.Stream()
        module = SourceModule(_KERNELS, no_extern_c=True)
        self._scatter = module.get_function("scatter32" if self.dtype.itemsize == 4
                                            else "scatter16")
        self._copy = module.get_function("copy_blocks")
        self._slots = None  # device buffer for the step's slot mapping, grown as needed
        self._slots_cap = 0

    def key(self, layer: int) -> int:
        return int(self.buffer) + (2 * layer) * self.plane_bytes

    def value(self, layer: int) -> int:
        return int(self.buffer) + (2 * layer + 1) * self.plane_bytes

    def _grid(self, total: int) -> tuple[int, int, int]:
        return (max(1, min((total + self.THREADS - 1) // self.THREADS, 65535)), 1, 1)

    def write(self, new_kv_ptr: int, slot_mapping: np.ndarray) -> None:
        """Scatter a call's new K/V, [L, 2, S, T, kv_heads, head_dim] at `new_kv_ptr` on the
        device, into the pool at `slot_mapping` [S, T] (-1: padding)."""
        with self.current():
            self._write(new_kv_ptr, slot_mapping)

    def _write(self, new_kv_ptr: int, slot_mapping: np.ndarray) -> None:
        cuda = self._cuda
        slots = np.ascontiguousarray(slot_mapping, dtype=np.int64).reshape(-1)
        n = slots.size
        if n == 0:
            return
        if slots.max() >= self.num_blocks * self.block_size or (
                slots[slots >= 0].min(initial=self.block_size) < self.block_size):
            raise ValueError("slot_mapping out of range (the null block is never written)")
        if n > self._slots_cap:
            self._slots = cuda.mem_alloc(n * 8)
            self._slots_cap = n
        cuda.memcpy_htod_async(self._slots, slots, self.stream)
        total = self.num_layers * 2 * n * self.num_kv_heads * self.head_dim
        self._scatter(np.uintp(new_kv_ptr), self.buffer, self._slots, np.int64(n),
                      np.int32(self.num_layers * 2), np.int32(self.num_kv_heads),
                      np.int32(self.block_size), np.int32(self.head_dim),
                      np.int64(self.num_blocks), block=(self.THREADS, 1, 1),
                      grid=self._grid(total), stream=self.stream)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        if not pairs:
            return
        with self.current():
            self._copy_blocks(pairs)

    def _copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        idx = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if set(idx[:, 1].tolist()) & set(idx[:, 0].tolist()):
            raise ValueError(f"copy_blocks pairs chain (a destination is also a source): {pairs}")
        if idx.min() < 0 or idx.max() >= self.num_blocks or idx[:, 1].min() < 1:
            raise ValueError(f"copy_blocks pairs out of range: {pairs}")
        cuda = self._cuda
        dev = cuda.mem_alloc(idx.nbytes)
        cuda.memcpy_htod_async(dev, idx, self.stream)
        words = self.num_kv_heads * self.block_size * self.head_dim * self.dtype.itemsize // 4
        total = self.num_layers * 2 * len(idx) * words
        self._copy(self.buffer, dev, np.int32(len(idx)), np.int32(self.num_layers * 2),
                   np.int64(self.num_blocks), np.int64(words), block=(self.THREADS, 1, 1),
                   grid=self._grid(total), stream=self.stream)
        self.stream.synchronize()  # `dev` may be freed after this

    def read(self) -> np.ndarray:
        """The whole pool on the host (tests and diagnostics only: it crosses the bus)."""
        out = np.empty((self.num_layers, 2, self.num_blocks, self.num_kv_heads,
                        self.block_size, self.head_dim), self.dtype)
        with self.current():
            self.stream.synchronize()
            self._cuda.memcpy_dtoh(out, self.buffer)
        return out

    def synchronize(self) -> None:
        with self.current():
            self.stream.synchronize()

    def close(self) -> None:
        if self.buffer is not None:
            with self.current():
                self.stream.synchronize()
                self.buffer.free()
            self.buffer = None
