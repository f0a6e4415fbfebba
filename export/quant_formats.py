"""Quantized weight formats: the integer grids, their scales, and round-to-nearest onto them.

One representation for every flavour: `QuantizedWeight` holds integer codes laid out like the
float weight [out, in] (HF layout), with one scale (and, asymmetric, one zero point or minimum) per
output channel and block of the input dimension. The graph emitters (quant_graph.py) only re-lay
these codes out for their operator; they never re-round, so the portable and cpu flavours of one
precision carry the same numbers.

Grids (value = what the graph computes):
- int8, per output channel, symmetric: value = scale * q, q in [-127, 127].
- int4, blocks along the input dimension, symmetric: value = scale * q, q in [-8, 7] (zero point 0,
  what TensorRT's DequantizeLayer accepts).
- int4 asymmetric, integer zero point: value = scale * (q - z), q, z in [0, 15] (MatMulNBits'
  packed uint8 zero points, AWQ/GPTQ's usual format).
- int4 asymmetric, float minimum: value = scale * q + minimum, q in [0, 15]: llama.cpp's Q4_1 (and
  MLX's affine) grid, so weights that came from a Q4_1 file are reproduced exactly.
Scales (and minimums) are rounded to their storage dtype BEFORE the codes are chosen, so the codes
are optimal for the numbers the graph actually multiplies by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ZERO_POINT_KINDS = ("int", "float")


@dataclass(frozen=True)
class Grid:
    """How one weight is quantized: the scheme a manifest records per layer."""

    bits: int  # 8 or 4
    block: int | None  # elements along the input dim sharing a scale; None = whole row
    symmetric: bool = True
    zero_point: str | None = None  # asymmetric only: "int" or "float" (a float minimum)
    scale_dtype: str = "float16"  # float16 | float32

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"unsupported bit width {self.bits}")
        if self.symmetric != (self.zero_point is None):
            raise ValueError("a symmetric grid has no zero point; an asymmetric one needs one")
        if self.zero_point is not None and self.zero_point not in ZERO_POINT_KINDS:
            raise ValueError(f"zero point kind must be one of {ZERO_POINT_KINDS}")
        if self.scale_dtype not in ("float16", "float32"):
            raise ValueError("scale dtype must be float16 or float32")

    @property
    def qmin(self) -> int:
        if self.symmetric:
            return -127 if self.bits == 8 else -8
        return 0

    @property
    def qmax(self) -> int:
        if self.symmetric:
            return 127 if self.bits == 8 else 7
        return (1 << self.bits) - 1

    def to_manifest(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block, "symmetric": self.symmetric,
                "zero_point": self.zero_point, "scale_dtype": self.scale_dtype}


# The smallest positive normal of each scale dtype: what a scale that would be 0 becomes (an
# all-zero block, or a block of weights so tiny that its scale rounds to 0 in float16), so every
# DequantizeLinear scale is strictly positive (TensorRT requires it) and codes never divide by 0.
# Such a block's codes are all 0. Subnormal scales are kept: they are positive and exact.
SCALE_FLOOR = {"float16": float(np.finfo(np.float16).tiny),
               "float32": float(np.finfo(np.float32).tiny)}


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in `dtype` (float16 saturates instead of inf)."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        fmax = float(np.finfo(np.float16).max)
        return np.clip(x, -fmax, fmax).astype(np.float16).astype(np.float32)
    return x


@dataclass
class QuantizedWeight:
    """Codes and parameters of one [out, in] weight; `k_padded` columns (the tail zero) so every
    block is whole. Blocks are contiguous runs of `grid.block` input columns."""

    name: str
    grid: Grid
    codes: np.ndarray  # [n, k_padded] int16 (values in [qmin, qmax])
    scale: np.ndarray  # [n, blocks] float32, exact in grid.scale_dtype
    zero: np.ndarray | None  # [n, blocks]: int codes ("int") or float32 minimum ("float")
    k: int  # real input size
    method: str = "rtn"

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k_padded(self) -> int:
        return int(self.codes.shape[1])

    @property
    def block(self) -> int:
        return self.grid.block or self.k_padded

    @property
    def blocks(self) -> int:
        return int(self.scale.shape[1])

    def dequantize(self) -> np.ndarray:
        """The float weight [n, k] the graph computes with."""
        c = self.codes.astype(np.float32).reshape(self.n, self.blocks, self.block)
        s = self.scale[:, :, None]
        if self.grid.zero_point == "float":
            w = c * s + self.zero[:, :, None]  # type: ignore[index]
        elif self.grid.zero_point == "int":
            w = (c - self.zero[:, :, None].astype(np.float32)) * s  # type: ignore[index]
        else:
            w = c * s
        return w.reshape(self.n, self.k_padded)[:, : self.k]

    def manifest(self, **extra: Any) -> dict[str, Any]:
        return {**self.grid.to_manifest(), "block_size": self.block, "in": self.k,
                "out": self.n, "k_padded": self.k_padded, "method": self.method, **extra}


def choose_block(k: int, group: int, flavour: str) -> int:
    """The block size actually used for an input dimension k when `group` was asked for.

    portable: TensorRT rejects partial blocks, so the largest divisor of k not above `group`
    (576 with 128 -> 96); refused below 16, where a "block" is no longer a block.
    cpu: MatMulNBits wants a power of two >= 16; the tail block is padded with zeros instead."""
    if flavour == "cpu":
        if group < 16 or group & (group - 1):
            raise ValueError(f"cpu flavour block size must be a power of two >= 16, got {group}")
        return group
    best = max(d for d in range(1, min(group, k) + 1) if k % d == 0)
    if best < 16:
        raise ValueError(
            f"input dimension {k} has no divisor in [16, {group}]: the portable flavour needs "
            "whole blocks (TensorRT rejects partial ones); choose another --group-size")
    return best


def grid_params(w: np.ndarray, grid: Grid, clip: float | np.ndarray = 1.0
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero) per row of `w` [..., block], optionally shrinking the range by `clip`
    (a clipping search passes ratios < 1). Rounded to the storage dtype."""
    wmin = np.minimum(w.min(axis=-1), 0.0) if grid.symmetric else w.min(axis=-1)
    wmax = np.maximum(w.max(axis=-1), 0.0) if grid.symmetric else w.max(axis=-1)
    wmin, wmax = wmin * clip, wmax * clip
    floor = SCALE_FLOOR[grid.scale_dtype]
    if grid.symmetric:
        scale = round_to_dtype(np.maximum(wmax / grid.qmax, wmin / grid.qmin), grid.scale_dtype)
        return np.where(scale > 0, scale, floor).astype(np.float32), None
    scale = round_to_dtype(np.where(wmax > wmin, (wmax - wmin) / grid.qmax, 1.0),
                           grid.scale_dtype)
    scale = np.where(scale > 0, scale, floor).astype(np.float32)
    if grid.zero_point == "float":
        return scale, round_to_dtype(wmin, grid.scale_dtype)
    zero = np.clip(np.round(-wmin / scale), 0, grid.qmax)
    return scale, zero.astype(np.float32)


def quantize_to(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                grid: Grid) -> np.ndarray:
    """Nearest codes for w [..., block] given per-row parameters [...]."""
    s = scale[..., None]
    if grid.zero_point == "float":
        q = np.round((w - zero[..., None]) / s)  # type: ignore[index]
    elif grid.zero_point == "int":
        q = np.round(w / s) + zero[..., None]  # type: ignore[index]
    else:
        q = np.round(w / s)
    return np.clip(q, grid.qmin, grid.qmax)


def dequantize_codes(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                     grid: Grid) -> np.ndarray:
    s = scale[..., None]
    if grid.zero_point == "float":
        return q * s + zero[..., None]  # type: ignore[index]
    if grid.zero_point == "int":
        return (q - zero[..., None]) * s  # type: ignore[index]
    return q * s


def clip_search(w: np.ndarray, grid: Grid, importance: np.ndarray | None = None,
                ratios: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block range shrink minimising the (importance-weighted) squared error; w [..., block].
    importance: per input column weights [block] or [..., block] (e.g. the Hessian diagonal)."""
    ratios = np.linspace(1.0, 0.7, 13) if ratios is None else ratios
    imp = np.ones(w.shape[-1], np.float32) if importance is None else importance
    best_err = np.full(w.shape[:-1], np.inf, np.float32)
    best_s, best_z = grid_params(w, grid)
    for r in ratios:
        s, z = grid_params(w, grid, float(r))
        err = (((dequantize_codes(quantize_to(w, s, z, grid), s, z, grid) - w) ** 2) * imp).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if best_z is not None and z is not None:
            best_z = np.where(better, z, best_z)
    return best_s, best_z


def pad_columns(w: np.ndarray, block: int) -> np.ndarray:
    k = w.shape[1]
    kp = -(-k // block) * block
    if kp == k:
        return np.ascontiguousarray(w, np.float32)
    out = np.zeros((w.shape[0], kp), np.float32)
    out[:, :k] = w
    return out


def rtn(name: str, w: np.ndarray, grid: Grid, search: bool = False,
        importance: np.ndarray | None = None) -> QuantizedWeight:
    """Round-to-nearest of w [out, in]; with `search`, a per-block clipping search first.
    Padded tail columns never influence a block's range."""
    n, k = w.shape
    block = grid.block or k
    wp = pad_columns(w, block)
    nb = wp.shape[1] // block
    blocks = wp.reshape(n, nb, block)
    if wp.shape[1] != k:  # make the padding invisible to min/max: repeat the block's last value
        tail = blocks[:, -1, :]
        real = k - (nb - 1) * block
        tail[:, real:] = tail[:, real - 1: real]
    if search:
        imp = None if importance is None else pad_columns(importance[None], block).reshape(
            nb, block)
        s, z = clip_search(blocks, grid, imp)
    else:
        s, z = grid_params(blocks, grid)
    q = quantize_to(blocks, s, z, grid).reshape(n, nb * block)
    q[:, k:] = 0 if grid.symmetric else q[:, k:]
    return QuantizedWeight(name, grid, q.astype(np.int16), s.astype(np.float32),
                           None if z is None else z.astype(np.float32), k,
                           method="rtn+clip" if search else "rtn")
