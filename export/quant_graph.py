"""ONNX for quantized projections, one function per (precision, flavour). Each takes a
`QuantizedWeight` (quant_formats.py) and only re-lays its codes out for its operator.

portable (standard ONNX, what TensorRT's parser consumes; float16 activations, so every
DequantizeLinear scale is float16: in a strongly typed network a DQ outputs its scale's type):
- int8 W8A8: QuantizeLinear/DequantizeLinear on the activation with a static per-tensor scale from
  calibration (after SmoothQuant's per-channel division), DequantizeLinear of the per-channel int8
  weight, MatMul. TensorRT fuses Q/DQ around the MatMul into an int8 GEMM.
- int4 W4A16: opset-21 blocked DequantizeLinear (a 2-D int4 initializer [K, N] straight into the
  DQ, no zero point: symmetric, block along the input dim, a block size dividing it exactly)
  then MatMul.
cpu (ONNX Runtime's CPU kernels):
- int8: activations quantized PER ROW at run time (a per-tensor dynamic scale would let one
  sequence, or a padding row, change another sequence's result), then MatMulInteger. Both operands
  are uint8 with zero point 128: on AVX2 without VNNI ORT's u8s8 kernel sums pairs of products in
  saturating int16 and measurably overflows (128012 off on a 576-long dot product here), u8u8 does
  not.
- int4: com.microsoft MatMulNBits (int8-compute accuracy level 4: ~3.5x faster than fp32 at one
  row here; fp32-compute level 0 is no faster than fp32). With a float minimum (Q4_1's grid) the
  kernel's float-zero-point path measured ~10x slower than fp32, so the minimum is applied as
  sum over blocks of (x's block sum) * (min + 8 * scale), one small MatMul, beside a symmetric
  MatMulNBits: exact in real arithmetic, and fast.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto

from export.graph import _Builder
from export.quant_formats import QuantizedWeight


class QuantOps:
    """Emitters sharing one builder and its constants."""

    def __init__(self, b: _Builder, accuracy_level: int = 4, act: int = TensorProto.FLOAT):
        self.b = b
        self.accuracy_level = accuracy_level
        self.act = act  # the graph's activation dtype (FLOAT or FLOAT16)
        self.np_act = np.dtype(np.float16 if act == TensorProto.FLOAT16 else np.float32)
        self._consts: dict[str, str] = {}

    def _c(self, key: str, value: np.ndarray) -> str:
        if key not in self._consts:
            self._consts[key] = self.b.const(value, f"quant.{key}")
        return self._consts[key]

    def _to_act(self, x: str, dtype: np.dtype) -> str:
        """x (of numpy dtype `dtype`) in the activation dtype."""
        return x if np.dtype(dtype) == self.np_act else self.b.op("Cast", x, to=self.act)

    # ---- fp16 weights ------------------------------------------------------------------------
    def fp16_matmul(self, x: str, weight_t: np.ndarray, name: str, out: str | None = None) -> str:
        """Weights stored as float16: a float16 GEMM in a float16 graph; in a float32 graph
        widened once (ORT folds the Cast at session load)."""
        b = self.b
        w = self._to_act(b.const(weight_t, name, np.float16), np.float16)
        return b.op("MatMul", x, w, name=out)

    # ---- int8 --------------------------------------------------------------------------------
    def int8_weight_u8(self, qw: QuantizedWeight, name: str) -> tuple[str, str]:
        """[K, N] uint8 codes + 128 and the per-channel float scale [N]."""
        assert qw.grid.bits == 8 and qw.blocks == 1
        codes = (qw.codes[:, : qw.k].T.astype(np.int16) + 128).astype(np.uint8)
        return (self.b.const(np.ascontiguousarray(codes), name),
                self.b.const(qw.scale[:, 0].astype(np.float32), name + ".scale"))

    def int8_weight_s8(self, qw: QuantizedWeight, name: str) -> tuple[str, str]:
        """[K, N] int8 codes and the per-channel scale [N] in the grid's scale dtype (the
        activation dtype: a DequantizeLinear outputs its scale's type)."""
        assert qw.grid.bits == 8 and qw.blocks == 1
        codes = np.ascontiguousarray(qw.codes[:, : qw.k].T.astype(np.int8))
        return (self.b.const(codes, name),
                self.b.const(qw.scale[:, 0].astype(np.dtype(qw.grid.scale_dtype)),
                             name + ".scale"))

    def int8_dynamic_rows(self, x: str, w_u8: str, w_scale: str, smooth_inv: str | None = None,
                          out: str | None = None) -> str:
        """cpu W8A8: per-row symmetric activation scale max|x| / 127, u8u8 MatMulInteger."""
        b = self.b
        if smooth_inv is not None:
            x = b.op("Mul", x, smooth_inv)
        axes = self._c("axes_last", np.array([-1], np.int64))
        amax = b.op("ReduceMax", b.op("Abs", x), axes, keepdims=1)
        amax = b.op("Max", amax, self._c("tiny", np.array(1e-20, np.float32)))
        row_scale = b.op("Mul", amax, self._c("inv127", np.array(1 / 127, np.float32)))
        q = b.op("Add", b.op("Round", b.op("Div", x, row_scale)),
                 self._c("f128", np.array(128, np.float32)))
        q = b.op("Cast", q, to=TensorProto.UINT8)
        zp = self._c("u8_128", np.array(128, np.uint8))
        acc = b.op("Cast", b.op("MatMulInteger", q, w_u8, zp, zp), to=TensorProto.FLOAT)
        return b.op("Mul", b.op("Mul", acc, row_scale), w_scale, name=out)

    def int8_weight_only(self, x: str, w_s8: str, w_scale: str, smooth_inv: str | None = None,
                         out: str | None = None) -> str:
        """W8A16: per-channel int8 weight dequantized, float activations."""
        b = self.b
        if smooth_inv is not None:
            x = b.op("Mul", x, smooth_inv)
        return b.op("MatMul", x, b.op("DequantizeLinear", w_s8, w_scale, axis=1), name=out)

    def int8_static(self, x: str, w_s8: str, w_scale: str, act_scale: float,
                    smooth_inv: str | None = None, out: str | None = None) -> str:
        """portable W8A8: static per-tensor activation Q/DQ, per-channel weight DQ, MatMul."""
        b = self.b
        if smooth_inv is not None:
            x = b.op("Mul", x, smooth_inv)
        s = b.const(np.array(act_scale, self.np_act))  # per tensor, exact in its dtype
        zp = self._c("i8_0", np.array(0, np.int8))
        xq = b.op("DequantizeLinear", b.op("QuantizeLinear", x, s, zp), s, zp)
        w = b.op("DequantizeLinear", w_s8, w_scale, axis=1)
        return b.op("MatMul", xq, w, name=out)

    # ---- the blocked int8 table (embedding + tied LM head, cpu) ----------------------------
    def int8_blocked_table(self, qw: QuantizedWeight, name: str) -> dict[str, object]:
        """MatMulNBits' 8-bit layout: B [N, blocks, block] uint8 (code + 128, its implicit zero
        point), scales [N * blocks] widened from float16 once (folded at session load)."""
        b = self.b
        n, nb, blk = qw.n, qw.blocks, qw.block
        codes = (qw.codes.astype(np.int16) + 128).astype(np.uint8).reshape(n, nb, blk)
        s16 = qw.scale.astype(np.dtype(qw.grid.scale_dtype)).reshape(-1)
        scales = b.op("Cast", b.const(s16, name + ".scales"), to=TensorProto.FLOAT)
        return {"B": b.const(np.ascontiguousarray(codes), name), "scales": scales,
                "n": n, "k": qw.k, "nb": nb, "block": blk}

    def int8_blocked_gather(self, t: dict, ids: str, hidden: int) -> str:
        """Embedding rows from the blocked table: [S, T, blocks, block] * scale -> [S, T, h]."""
        b = self.b
        rows = b.op("Cast", b.op("Gather", t["B"], ids, axis=0), to=TensorProto.FLOAT)
        rows = b.op("Sub", rows, self._c("f128", np.array(128, np.float32)))
        s2 = b.op("Reshape", t["scales"], b.const(np.array([t["n"], t["nb"], 1], np.int64)))
        rows = b.op("Mul", rows, b.op("Gather", s2, ids, axis=0))
        padded = t["nb"] * t["block"]
        rows = b.op("Reshape", rows, b.const(np.array([0, 0, padded], np.int64)))
        if padded != hidden:  # drop the zero tail of the last block
            rows = b.op("Slice", rows, b.const(np.array([0], np.int64)),
                        b.const(np.array([hidden], np.int64)),
                        self._c("axes_last", np.array([-1], np.int64)))
        return rows

    def int8_blocked_matmul(self, x: str, t: dict, out: str | None = None) -> str:
        """x @ table^T through MatMulNBits(bits=8): activations quantized per row and block
        inside the kernel (accuracy level 4), never across rows."""
        return self.b.op("MatMulNBits", x, t["B"], t["scales"], domain="com.microsoft",
                         name=out, K=t["k"], N=t["n"], bits=8, block_size=t["block"],
                         accuracy_level=4)

    # ---- int4 --------------------------------------------------------------------------------
    def int4_matmulnbits(self, x: str, qw: QuantizedWeight, name: str, rank: int,
                         out: str | None = None) -> str:
        """cpu W4A16 through com.microsoft MatMulNBits (K padded to whole blocks)."""
        b, g = self.b, qw.grid
        n, nb, block = qw.n, qw.blocks, qw.block
        u = qw.codes + 8 if g.symmetric else qw.codes  # the kernel's implicit zero point is 8
        u = u.astype(np.uint8).reshape(n, nb, block)
        packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
        scale16 = qw.scale.astype(np.dtype(g.scale_dtype))
        scales = b.op("Cast", b.const(scale16.reshape(-1), name + ".scales"),
                      to=TensorProto.FLOAT)
        inputs = [x, b.const(packed, name + ".qweight"), scales]
        if g.zero_point == "int":
            z = qw.zero.astype(np.uint8)  # type: ignore[union-attr]
            if nb % 2:
                z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
            zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
            inputs.append(b.const(zp, name + ".zeros"))
        attrs = dict(K=qw.k, N=n, bits=4, block_size=block, accuracy_level=self.accuracy_level)
        if g.zero_point != "float":
            return b.op("MatMulNBits", *inputs, domain="com.microsoft", name=out, **attrs)
        y = b.op("MatMulNBits", *inputs, domain="com.microsoft", **attrs)
        # value = s*q + m = s*(q - 8) + (m + 8 s): add (block sums of x) @ (m + 8 s)^T.
        mins = b.op("Cast", b.const(qw.zero.astype(np.dtype(g.scale_dtype)),  # type: ignore
                                    name + ".mins"), to=TensorProto.FLOAT)
        s2 = b.op("Reshape", scales, b.const(np.array([n, nb], np.int64)))
        corr = b.op("Transpose", b.op("Add", b.op("Mul", s2, self._c(
            "f8", np.array(8, np.float32))), mins), perm=[1, 0])  # [nb, N]
        xp = x
        if qw.k_padded != qw.k:
            pads = [0] * rank + [0] * (rank - 1) + [qw.k_padded - qw.k]
            xp = b.op("Pad", x, b.const(np.array(pads, np.int64)))
        shape = [0] * (rank - 1) + [nb, block]
        sums = b.op("ReduceSum", b.op("Reshape", xp, b.const(np.array(shape, np.int64))),
                    self._c("axes_last", np.array([-1], np.int64)), keepdims=0)
        return b.op("Add", y, b.op("MatMul", sums, corr), name=out)

    def int4_dq(self, x: str, qw: QuantizedWeight, name: str, out: str | None = None) -> str:
        """portable W4A16: blocked DequantizeLinear of int4 [K, N] (axis 0), zero point 0."""
        b, g = self.b, qw.grid
        if not g.symmetric or qw.k_padded != qw.k:
            raise ValueError(f"{name}: the portable flavour needs symmetric, whole blocks")
        codes = np.ascontiguousarray(qw.codes.T.astype(ml_dtypes.int4))  # [K, N]
        scale = np.ascontiguousarray(qw.scale.T.astype(np.dtype(g.scale_dtype)))  # [K/blk, N]
        w = b.op("DequantizeLinear", b.const(codes, name + ".qweight"),
                 b.const(scale, name + ".scales"), axis=0, block_size=qw.block)
        return b.op("MatMul", x, self._to_act(w, scale.dtype), name=out)
