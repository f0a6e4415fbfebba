"""The KV memory on the host: one preallocated pool of blocks for every layer, zero-initialised,
sized once from the memory budget and never grown, so an edge board's fixed budget can never be
overrun by the cache, and bound zero-copy by ONNX Runtime's CPU provider.

The pool is claimed when it is made: every page is written once, so the process's resident memory
is from the start what it will be after months of traffic (a budget that does not fit fails at
start-up, not in week three), and no page fault lands inside a step. Left to fault lazily, the
first touch of fresh pages did land in `write`: on a Zen 4 VM a 4-token decode write took 140-175
ms and the 16 prompt writes of a 16-stream run ~1 s of its ~10 s. Transparent huge pages are
declined for the pool: claiming 360 MiB with them took 1.9-2.4 s (the kernel compacting memory
for each 2 MiB page) against 0.14-0.2 s without, and decode steps at 256 and 4k tokens of context
did not measurably differ between the two.

Block 0 is the reserved null block (see DESIGN.md, "The paged-KV calling convention"): block tables
are padded with 0, so block 0 must stay all-zero forever; nothing is ever written into it. Which
blocks a sequence owns is the block allocator's business (core/block_allocator.py); this module
only holds the bytes.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["KVPool"]


def claimed_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array in its own anonymous mapping, without huge pages, every page resident (module
    docstring). The array keeps the mapping alive; it is unmapped when the array is collected."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    a = np.frombuffer(buf, dtype=dtype, count=math.prod(shape)).reshape(shape)
    a.fill(0)  # anonymous memory reads as zero already; the write is what makes it resident
    return a


class KVPool:
    """The preallocated KV memory: ONE array [num_layers, 2, num_blocks, kv_heads, block_size,
    head_dim], zero-initialised and never grown. Heads before slots, so the graph's GatherND of
    (block, head) slices yields the past already in the attention GEMMs' layout.

    One array rather than one per layer so that the graph's new K/V for all layers lands with a
    single vectorised assignment per step, and so that a device backend can register one buffer.
    Per-layer views (`key`, `value`) are contiguous, which is what zero-copy binding requires.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        for name, v in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = np.dtype(dtype)
        # Zeros (the null block must read as zeros), claimed now: see the module docstring.
        self._data = claimed_zeros(
            (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim), self.dtype)
        # Views with every (layer, k/v) plane first, so `write` and `copy_blocks` are one
        # fancy-index assignment over all layers at once.
        self._heads = self._data.reshape(num_layers * 2, num_blocks, num_kv_heads, block_size,
                                         head_dim)
        self._blocks = self._data.reshape(num_layers * 2, num_blocks, -1)
        assert np.shares_memory(self._heads, self._data)  # a copy here would silently drop writes

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: npt.DTypeLike,
    ) -> int:
        """Bytes one block costs across all layers, K and V; the unit of the memory budget."""
        itemsize = np.dtype(dtype).itemsize
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    @staticmethod
    def num_blocks_for_budget(
        budget_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: npt.DTypeLike,
    ) -> int:
        """How many blocks (null block included) fit in `budget_bytes`.

        Raises rather than returning a useless pool: with fewer than two blocks no sequence could
        ever be admitted, and failing at start-up beats every request waiting forever.
        """
        per_block = KVPool.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        n = max(int(budget_bytes), 0) // per_block
        if n < 2:
            raise ValueError(
                f"KV budget of {budget_bytes} bytes fits {n} block(s) of {per_block} bytes "
                f"({num_layers} layers x K,V x {block_size} tokens x {num_kv_heads} kv heads x "
                f"{head_dim} x {np.dtype(dtype).itemsize} B); at least 2 are needed (block 0 is "
                f"the reserved null block), i.e. a budget of >= {2 * per_block} bytes"
            )
        return n

    @property
    def data(self) -> np.ndarray:
        """The whole pool, for backends that register a single buffer."""
        return self._data

    def key(self, layer: int) -> np.ndarray:
        """Layer's K pool [num_blocks, kv_heads, block_size, head_dim]: contiguous, so bindable."""
        return self._data[layer, 0]

    def value(self, layer: int) -> np.ndarray:
        """Layer's V pool [num_blocks, kv_heads, block_size, head_dim]: contiguous, so bindable."""
        return self._data[layer, 1]

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def write(self, new_kv: np.ndarray, slot_mapping: np.ndarray) -> None:
        """Scatter the graph's new K/V into the pool, all layers in one assignment.

        `new_kv` is [L, 2, S, T, kv_heads, head_dim]; `slot_mapping` [S, T] gives each token's flat
        slot (block_id * block_size + offset) or -1 for padding. Padded rows hold finite garbage
        (see the masking rule in DESIGN.md), so they must never reach the pool. Slots inside the
        null block are refused because the whole convention relies on block 0 staying zero.
        """
        L, kvh, d = self.num_layers, self.num_kv_heads, self.head_dim
        if new_kv.ndim != 6 or new_kv.shape[:2] != (L, 2) or new_kv.shape[4:] != (kvh, d):
            raise ValueError(f"new_kv must be [{L}, 2, S, T, {kvh}, {d}], got {list(new_kv.shape)}")
        S, T = new_kv.shape[2], new_kv.shape[3]
        if slot_mapping.shape != (S, T):
            raise ValueError(
                f"slot_mapping must be [S, T] = [{S}, {T}] to match new_kv, "
                f"got {list(slot_mapping.shape)}"
            )
        if not np.issubdtype(slot_mapping.dtype, np.integer):
            raise TypeError(f"slot_mapping must be integer, got {slot_mapping.dtype}")
        slots = slot_mapping.reshape(-1).astype(np.intp, copy=False)
        if slots.size == 0:
            return
        src = new_kv.reshape(L * 2, S * T, kvh, d)
        lo = int(slots.min())
        if lo < 0:
            if lo < -1:
                raise ValueError(f"slot_mapping holds {lo}; only -1 (padding) may be negative")
            valid = slots >= 0
            slots = slots[valid]
            if slots.size == 0:
                return
            src = src[:, valid]
            lo = int(slots.min())
        hi = int(slots.max())
        if lo < self.block_size or hi >= self.num_blocks * self.block_size:
            raise ValueError(
                f"slot_mapping out of range [{self.block_size}, "
                f"{self.num_blocks * self.block_size}): min {lo}, max {hi} "
                "(slots in block 0, the null block, are never written)"
            )
        # Two index arrays around a slice: numpy puts the token axis first, [n, L*2, kvh, d].
        self._heads[:, slots // self.block_size, :, slots % self.block_size] = src.transpose(
            1, 0, 2, 3)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy each (src, dst) block in every layer, K and V: the data half of copy-on-write.

        All sources are read before any destination is written (numpy materialises the gathered
        right-hand side), so chains such as [(1, 2), (2, 3)] copy the ORIGINAL contents.
        """
        if len(pairs) == 0:
            return
        idx = np.asarray(pairs, dtype=np.intp).reshape(-1, 2)
        src, dst = idx[:, 0], idx[:, 1]
        nb = self.num_blocks
        if src.min() < 0 or src.max() >= nb or dst.min() < 1 or dst.max() >= nb:
            raise ValueError(
                f"copy_blocks pairs out of range: sources must be in [0, {nb}), destinations in "
                f"[1, {nb}) (the null block is never written); got {idx.tolist()}"
            )
        if np.unique(dst).size != dst.size:
            raise ValueError(f"copy_blocks has a repeated destination: {idx.tolist()}")
        self._blocks[:, dst] = self._blocks[:, src]
