"""`edgert check-trt`: a static TensorRT 10 check of a bundle's portable ONNX graph.

Engines are built on the board (shared/DESIGN.md), so a graph that TensorRT's ONNX parser rejects
would only be found there, after the bundle shipped. This module checks, on any CPU machine and
without TensorRT, the rules the parser and builder are known to enforce, using what the parser's
documentation and source (onnx/onnx-tensorrt, 10.x) say, and names the node or tensor that breaks
each one. Passing is necessary, not sufficient: nothing here runs TensorRT.

The graph is read with `load_external_data=False`; an initializer's values are read (one tensor
at a time, from its external file) only where a rule needs them: Q/DQ scales and zero points.

Rules, and what TensorRT does otherwise:

- ir-version: `model.ir_version <= 10`. TensorRT 10's parser is built against ONNX 1.16 (IR 10);
  a newer IR may hold fields it cannot read.
- opset: standard-domain opset in [9, 21]. The exporter uses 21, which blocked (INT4)
  DequantizeLinear needs. The 10.0 operator docs say "opset 9 to opset 20", but the parser only
  asserts >= 7 and reads opset-21 blocked DequantizeLinear (INT4 support came with 10.0).
- operators: every node is a standard-domain op on TensorRT 10's support list. Anything else
  (com.microsoft MatMulNBits, MatMulInteger, ...) fails to parse ("No importer registered for op"),
  which is why ORT-only ops belong to the cpu flavour only.
- operator-types: the element types of each node's data tensors are among the op's supported
  types (from ONNX shape inference; an unknown type never fails). In TensorRT 10, INT8, INT4 and
  FP8 exist only on the quantized side of Q/DQ: the 10.0 list dropped INT8 from Gather,
  Transpose and Cast (9.3 still had it), so e.g. a Gather of an int8 embedding table fails.
- constant-axes: `axes` of Slice, Squeeze, Unsqueeze, Pad and Reduce* (and CumSum's `axis`) are
  initializers or Constant outputs; TensorRT needs them when the network is built.
- scatternd-reduction: ScatterND has no `reduction` attribute; the importer rejects it, any value.
- qdq-zero-point: QuantizeLinear / DequantizeLinear zero points are constant and all zero, of the
  scale's volume (TensorRT quantizes symmetrically only).
- int4-blocked-dq: an INT4 DequantizeLinear (TensorRT 10.3: weight-only quantization) takes a 2-D
  INT4 initializer directly, with an even last dimension (INT4 packing); its scale is a constant
  of the same rank with exactly one blocked axis; the block size is INFERRED from the shapes (the
  `block_size` attribute is not read), must divide that dimension exactly and equal the attribute
  (otherwise ORT and TensorRT would compute different weights); scales are float16/float32/
  bfloat16 and strictly positive ("Scale coefficients must all be positive": an all-zero block
  whose scale rounded to 0 in float16 is enough to reject the graph).
- int8-qdq-scales: INT8 Q/DQ of activations use a per-tensor scale (TensorRT quantizes activations
  per tensor only); per-channel scales only on constant weights, one per channel of `axis`;
  constant scales strictly positive.
- kv-pool-consumers: each KV pool input's only consumer is its GatherND. A Cast or Slice in front
  of it is legal ONNX but copies the whole pool (hundreds of MB) every step.
- kv-pool-layout: pools are FLOAT or FLOAT16 `[num_blocks, kv_heads, block_size, head_dim]`, the
  layout the runtime allocates and binds with `setTensorAddress`.
- static-shapes: every shape-typed input (Reshape/Expand shape, Tile repeats, ConstantOfShape,
  Range, Slice starts/ends/axes/steps, Pad pads, Split split, TopK K) is computed from
  initializers, Constants and Shape/Size outputs only, never from a graph input's VALUE (e.g.
  `Range(0, ReduceMax(context_lens))`): TensorRT's shape tensors must be known from the input
  dimensions when the execution context is configured.
- index-inputs-int32: input_ids, positions, query_lens, context_lens, block_tables and
  logits_indices are INT32, what the runtime binds.
- tensor-volume: no tensor holds more than 2^31 - 1 elements at the largest shapes the runtime
  uses (the int32 element count most TensorRT layers are limited to): the pools, the gathered
  past [S, kvh, B, bs, d], the attention scores [S, kvh, g*T, B*bs], the logits [N, vocab],
  new_kv, and every tensor whose inferred shape only uses those dimensions.
- profile-dims: the inputs' dims the runtime varies between the two optimisation profiles (decode
  T = 1; prefill T in [2, budget]; S, B, N ranges) are symbolic and named S/T/B/N, the pool's
  num_blocks (fixed per engine) and block_size are symbolic or match the manifest, every other dim
  is the config's value, and no input lies outside the calling convention.

If/Loop/Scan bodies are checked by the operators rule only (the exporter emits none).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

DEFAULT_TRT = "10.3"
MAX_IR_VERSION = 10  # onnx-tensorrt 10.x builds against ONNX 1.16 (IR version 10)
MIN_OPSET, MAX_OPSET = 9, 21
MAX_VOLUME = 2**31 - 1

# TensorRT 10's ONNX operator support list: (op, supported types, restrictions), the rows marked
# "Y" in onnx/onnx-tensorrt docs/operators.md at `main` (commit 7ecb49a, 2024-05-02: the 10.0 GA
# list; the 10.1 GA release adds DeformConv and documents a few restrictions of ops we do not
# use, e.g. TopK `K` < 3840). Used as the allow-list for 10.3, since later releases only add.
# Copied verbatim, typos included ("INT64 BOOL", ", ,"); the parser below splits on both.
_TRT10_OPERATORS: tuple[tuple[str, str, str], ...] = (
    ('Abs', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Acos', 'FP32, FP16, BF16', ''),
    ('Acosh', 'FP32, FP16, BF16', ''),
    ('Add', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('And', 'BOOL', ''),
    ('ArgMax', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('ArgMin', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Asin', 'FP32, FP16, BF16', ''),
    ('Asinh', 'FP32, FP16, BF16', ''),
    ('Atan', 'FP32, FP16, BF16', ''),
    ('Atanh', 'FP32, FP16, BF16', ''),
    ('AveragePool', 'FP32, FP16, BF16',
     '2D or 3D Pooling only. `dilations` must be empty or all ones'),
    ('BatchNormalization', 'FP32, FP16, BF16', ''),
    ('Cast', 'FP32, FP16, BF16, INT32, INT64, , UINT8, BOOL', ''),
    ('CastLike', 'FP32, FP16, BF16, INT32, INT64, , UINT8, BOOL', ''),
    ('Ceil', 'FP32, FP16, BF16', ''),
    ('Celu', 'FP32, FP16, BF16', ''),
    ('Clip', 'FP32, FP16, BF16', ''),
    ('Concat', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Constant', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('ConstantOfShape', 'FP32', ''),
    ('Conv', 'FP32, FP16, BF16', ''),
    ('ConvTranspose', 'FP32, FP16, BF16', ''),
    ('Cos', 'FP32, FP16, BF16', ''),
    ('Cosh', 'FP32, FP16, BF16', ''),
    ('CumSum', 'FP32, FP16, BF16', '`axis` must be an initializer'),
    ('DepthToSpace', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('DequantizeLinear', 'INT8, FP8, INT4', '`x_zero_point` must be zero'),
    ('Div', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Dropout', 'FP32, FP16, BF16', ''),
    ('Einsum', 'FP32, FP16, BF16', ''),
    ('Elu', 'FP32, FP16, BF16', ''),
    ('Equal', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Erf', 'FP32, FP16, BF16', ''),
    ('Exp', 'FP32, FP16, BF16', ''),
    ('Expand', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('EyeLike', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Flatten', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Floor', 'FP32, FP16, BF16', ''),
    ('Gather', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('GatherElements', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('GatherND', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Gelu', 'FP32, FP16, BF16, INT8, INT32, INT64', ''),
    ('Gemm', 'FP32, FP16, BF16', ''),
    ('GlobalAveragePool', 'FP32, FP16, BF16', ''),
    ('GlobalLpPool', 'FP32, FP16, BF16', ''),
    ('GlobalMaxPool', 'FP32, FP16, BF16', ''),
    ('Greater', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('GreaterOrEqual', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('GridSample', 'FP32, FP16', ''),
    ('GroupNormalization', 'FP32, FP16, BF16', ''),
    ('GRU', 'FP32, FP16, BF16',
     'For bidirectional GRUs, activation functions must be the same for both the '
     'forward and reverse pass'),
    ('HardSigmoid', 'FP32, FP16, BF16', ''),
    ('HardSwish', 'FP32, FP16, BF16', ''),
    ('Hardmax', 'FP32, FP16, BF16', '`axis` dimension of input must be a build-time constant'),
    ('Identity', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('If', 'FP32, FP16, BF16, INT32, INT64, BOOL',
     'Output tensors of the two conditional branches must have broadcastable shapes, '
     'and must have different names'),
    ('ImageScaler', 'FP32, FP16, BF16', ''),
    ('InstanceNormalization', 'FP32, FP16, BF16', ''),
    ('IsInf', 'FP32, FP16, BF16', ''),
    ('IsNaN', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('LayerNormalization', 'FP32, FP16, BF16', ''),
    ('LeakyRelu', 'FP32, FP16, BF16', ''),
    ('Less', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('LessOrEqual', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Log', 'FP32, FP16, BF16', ''),
    ('LogSoftmax', 'FP32, FP16, BF16', ''),
    ('Loop', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('LRN', 'FP32, FP16, BF16', ''),
    ('LSTM', 'FP32, FP16, BF16',
     'For bidirectional LSTMs, activation functions must be the same for both the '
     'forward and reverse pass'),
    ('LpNormalization', 'FP32, FP16, BF16', ''),
    ('LpPool', 'FP32, FP16, BF16', '`dilations` must be empty or all ones'),
    ('MatMul', 'FP32, FP16, BF16', ''),
    ('Max', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('MaxPool', 'FP32, FP16, BF16',
     '2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be '
     'empty or all ones'),
    ('Mean', 'FP32, FP16, BF16, FP8, INT32, INT64', ''),
    ('MeanVarianceNormalization', 'FP32, FP16, BF16', ''),
    ('Min', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Mish', 'FP32, FP16', ''),
    ('Mod', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Mul', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Neg', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('NonMaxSuppression', 'FP32, FP16', ''),
    ('NonZero', 'FP32, FP16', ''),
    ('Not', 'BOOL', ''),
    ('OneHot', 'FP32, FP16, BF16, INT32, INT64, BOOL', '`depth` must be a build-time constant'),
    ('Or', 'BOOL', ''),
    ('Pad', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ParametricSoftplus', 'FP32, FP16, BF16', ''),
    ('Pow', 'FP32, FP16, BF16', ''),
    ('PRelu', 'FP32, FP16, BF16', ''),
    ('QuantizeLinear', 'FP32, FP16, BF16', '`y_zero_point` must be 0'),
    ('RandomNormal', 'FP32, FP16, BF16', '`seed` value is ignored by TensorRT'),
    ('RandomNormalLike', 'FP32, FP16, BF16', '`seed` value is ignored by TensorRT'),
    ('RandomUniform', 'FP32, FP16, BF16', '`seed` value is ignored by TensorRT'),
    ('RandomUniformLike', 'FP32, FP16, BF16', '`seed` value is ignored by TensorRT'),
    ('Range', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Reciprocal', 'FP32, FP16, BF16', ''),
    ('ReduceL1', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceL2', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceLogSum', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceLogSumExp', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceMax', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceMean', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceMin', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceProd', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceSum', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('ReduceSumSquare', 'FP32, FP16, BF16, INT32, INT64', '`axes` must be an initializer'),
    ('Relu', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Reshape', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Resize', 'FP32, FP16, BF16',
     'Supported resize transformation modes: `half_pixel`, `pytorch_half_pixel`, '
     '`tf_half_pixel_for_nn`, `asymmetric`, and `align_corners`.<br />Supported resize'
     ' modes: `nearest`, `linear`.<br />Supported nearest modes: `floor`, `ceil`, '
     '`round_prefer_floor`, `round_prefer_ceil`.<br />Supported aspect ratio policy: '
     '`stretch`.<br />When `scales` is a tensor input, `axes` must be an iota vector '
     'of length rank(input).<br />Antialiasing is not supported.'),
    ('ReverseSequence', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('RNN', 'FP32, FP16, BF16',
     'For bidirectional RNNs, activation functions must be the same for both the '
     'forward and reverse pass'),
    ('RoiAlign', 'FP32, FP16', ''),
    ('Round', 'FP32, FP16, BF16', ''),
    ('ScaledTanh', 'FP32, FP16, BF16', ''),
    ('Scan', 'FP32, FP16, BF16', ''),
    ('Scatter', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('ScatterElements', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('ScatterND', 'FP32, FP16, BF16, INT32, INT64', '`reduction` is not supported'),
    ('Selu', 'FP32, FP16, BF16,', ''),
    ('Shape', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Shrink', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Sigmoid', 'FP32, FP16, BF16', ''),
    ('Sign', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Sin', 'FP32, FP16, BF16', ''),
    ('Sinh', 'FP32, FP16, BF16', ''),
    ('Size', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Slice', 'FP32, FP16, BF16, INT32, INT64, BOOL', '`axes` must be an initializer'),
    ('Softmax', 'FP32, FP16, BF16', ''),
    ('Softplus', 'FP32, FP16, BF16', ''),
    ('Softsign', 'FP32, FP16, BF16', ''),
    ('SpaceToDepth', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Split', 'FP32, FP16, BF16, INT32, INT64 BOOL', ''),
    ('Sqrt', 'FP32, FP16, BF16', ''),
    ('Squeeze', 'FP32, FP16, BF16, INT32, INT64, BOOL', '`axes` must be an initializer'),
    ('Sub', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Sum', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Tan', 'FP32, FP16, BF16', ''),
    ('Tanh', 'FP32, FP16, BF16', ''),
    ('ThresholdedRelu', 'FP32, FP16, BF16', ''),
    ('Tile', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('TopK', 'FP32, FP16, BF16, INT32, INT64', ''),
    ('Transpose', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Trilu', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Unsqueeze', 'FP32, FP16, BF16, INT32, INT64, BOOL', '`axes` must be a constant tensor'),
    ('Upsample', 'FP32, FP16, BF16', ''),
    ('Where', 'FP32, FP16, BF16, INT32, INT64, BOOL', ''),
    ('Xor', 'BOOL', ''),
)


@dataclass(frozen=True)
class OpSupport:
    types: frozenset[str]
    restriction: str


_TYPE_ORDER = ("FP32", "FP16", "BF16", "FP8", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL")


def _types_text(types: frozenset[str]) -> str:
    return ", ".join(sorted(types, key=lambda t: (_TYPE_ORDER + (t,)).index(t)))


def _parse_types(text: str) -> frozenset[str]:
    return frozenset(t for t in re.split(r"[,\s]+", text) if t)


TRT10_OPS: dict[str, OpSupport] = {
    op: OpSupport(_parse_types(types), restriction) for op, types, restriction in _TRT10_OPERATORS}

# ONNX element type -> the name TensorRT's table uses (FP8 is E4M3). Others are not TensorRT types.
_TRT_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.DOUBLE: "DOUBLE",
}
_QUANTIZED = {"INT8", "INT4", "FP8"}
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_STANDARD_DOMAINS = ("", "ai.onnx")

# Which of a node's formal type constraints the table's "Supported Types" describe. Default: the
# first input's constraint (plus the outputs sharing it); these ops differ.
_TYPE_CONSTRAINTS: dict[str, tuple[str, ...]] = {
    "Where": ("T",), "Cast": ("T1", "T2"), "CastLike": ("T1", "T2"), "ConstantOfShape": ("T2",),
}
# Inputs that TensorRT needs as build-time constants (restriction "`axes` must be an initializer").
_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1}
# Shape-typed inputs: they become TensorRT shape tensors.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Pad": (1,), "Split": (1,), "TopK": (1,),
}
# Ops whose output carries only their input's SHAPE, never its values.
_SHAPE_OF = {"Shape", "Size"}

INDEX_INPUTS = ("input_ids", "positions", "query_lens", "context_lens", "block_tables",
                "logits_indices")
_INDEX_DIMS = {"input_ids": ("S", "T"), "positions": ("S", "T"), "query_lens": ("S",),
               "context_lens": ("S",), "block_tables": ("S", "B"), "logits_indices": ("N",)}
_POOL_NAME = re.compile(r"^kv_pool\.\d+\.(key|value)$")

RULES: dict[str, str] = {
    "ir-version": f"model.ir_version <= {MAX_IR_VERSION}",
    "opset": f"standard-domain opset in [{MIN_OPSET}, {MAX_OPSET}]",
    "operators": "every node is a standard-domain op on TensorRT 10's ONNX support list",
    "operator-types": "each node's tensors have element types the op supports in TensorRT 10",
    "constant-axes": "axes of Slice/Squeeze/Unsqueeze/Pad/Reduce* are initializers or Constants",
    "scatternd-reduction": "ScatterND has no reduction attribute",
    "qdq-zero-point": "QuantizeLinear/DequantizeLinear zero points are constant zeros",
    "int4-blocked-dq": "INT4 DequantizeLinear: 2-D initializer, one exact block axis, scales > 0",
    "int8-qdq-scales": "INT8 Q/DQ: per-tensor scales on activations, positive constant scales",
    "kv-pool-consumers": "each KV pool's only consumer is its GatherND",
    "kv-pool-layout": "KV pools are FLOAT/FLOAT16 [num_blocks, kv_heads, block_size, head_dim]",
    "static-shapes": "shape inputs come from initializers and Shape ops, never from values",
    "index-inputs-int32": "the index inputs are INT32",
    "tensor-volume": f"no tensor exceeds {MAX_VOLUME:,} elements at the largest shapes",
    "profile-dims": "inputs have the dynamic dims S/T/B/N the optimisation profiles vary",
}


@dataclass(frozen=True)
class Finding:
    """One result: a failure naming its node or tensor (`subject`), or a rule's single pass."""

    rule: str
    ok: bool
    message: str
    subject: str | None = None


@dataclass(frozen=True)
class Limits:
    """The largest shapes the runtime will use (engine config defaults) and the pool size."""

    max_seqs: int = 16  # S: max_num_seqs
    max_tokens: int = 256  # T: the prefill token budget (max_num_batched_tokens)
    max_blocks: int = 512  # B: blocks in one row of the block table
    num_blocks: int = 4096  # blocks in each pool
    block_size: int | None = None  # None: the manifest's kv.block_size (16 without one)
    max_logits: int | None = None  # N; None: max_seqs * max_tokens (every prompt position)

    @property
    def n(self) -> int:
        return self.max_logits if self.max_logits is not None else self.max_seqs * self.max_tokens

    @property
    def bs(self) -> int:
        return self.block_size if self.block_size is not None else 16

    def dims(self) -> dict[str, int]:
        return {"S": self.max_seqs, "T": self.max_tokens, "B": self.max_blocks, "N": self.n,
                "num_blocks": self.num_blocks, "block_size": self.bs}


def parse_trt_version(text: str) -> str:
    """'10.3' -> '10.3'; the rules here are TensorRT 10.x facts only."""
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", text.strip())
    if not m:
        raise ValueError(f"TensorRT version {text!r}: expected MAJOR.MINOR, e.g. 10.3")
    if m.group(1) != "10":
        raise ValueError(f"TensorRT {text}: only TensorRT 10.x parser rules are known here")
    return f"{m.group(1)}.{m.group(2)}"


# ---- the graph, indexed -------------------------------------------------------------------------
Dim = int | str | None


def _node_id(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{_node_id(node)}'"


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_int", "value_ints", "value_float", "value_floats"):
            v = onnx.helper.get_attribute_value(a)
            dtype = np.int64 if "int" in a.name else np.float32
            return numpy_helper.from_array(np.asarray(v, dtype), node.output[0])
    return None


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


class _Graph:
    """Producers, consumers, constants, element types and shapes of one model's main graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None):
        self.model = model
        self.g = model.graph
        self.base_dir = base_dir
        self.opset = next((o.version for o in model.opset_import
                           if o.domain in _STANDARD_DOMAINS), 0)
        self.inputs = {i.name: i for i in self.g.input}
        # An initializer that is also a graph input is only a default: not a constant.
        self.init = {t.name: t for t in self.g.initializer if t.name not in self.inputs}
        self.consts: dict[str, TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
            if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS:
                value = _constant_value(node)
                if value is not None:
                    self.consts[node.output[0]] = value
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[Dim]] = {}
        for vi in [*self._inferred_value_infos(), *self.g.input, *self.g.output]:
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.elem_type:
                self.types[vi.name] = tt.elem_type
                if tt.HasField("shape"):
                    self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else
                                            d.dim_param if d.HasField("dim_param") else None
                                            for d in tt.shape.dim]
        for name, t in [*self.init.items(), *self.consts.items()]:
            self.types[name] = t.data_type
            self.shapes[name] = list(t.dims)
        self._values: dict[str, np.ndarray | None] = {}

    def _inferred_value_infos(self) -> list[onnx.ValueInfoProto]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # a malformed graph: keep the declared value_info only
            return list(self.g.value_info)
        return [*self.g.value_info, *inferred.graph.value_info]

    def is_const(self, name: str) -> bool:
        return name in self.init or name in self.consts

    def values(self, name: str) -> np.ndarray | None:
        """A constant's values, reading only this tensor's external data; None if unreadable."""
        if name not in self._values:
            t = self.init.get(name) or self.consts.get(name)
            arr = None
            if t is not None:
                if external_data_helper.uses_external_data(t):
                    if self.base_dir is not None:
                        copy = TensorProto()
                        copy.CopyFrom(t)
                        try:
                            external_data_helper.load_external_data_for_tensor(
                                copy, str(self.base_dir))
                            arr = numpy_helper.to_array(copy)
                        except (OSError, ValueError, onnx.checker.ValidationError):
                            arr = None  # missing or out-of-bounds data: reported as unread
                else:
                    arr = numpy_helper.to_array(t)
            self._values[name] = arr
        return self._values[name]

    def trt_type(self, name: str) -> str | None:
        t = self.types.get(name)
        if t is None:
            return None
        return _TRT_TYPE_NAMES.get(t, TensorProto.DataType.Name(t))

    def label(self, name: str) -> str:
        """How a tensor is named in messages: with its producer when it has one."""
        node = self.producer.get(name)
        return f"'{name}'" if node is None else f"'{name}' (from {_node_label(node)})"

    @cached_property
    def value_taint(self) -> dict[str, str]:
        """tensor -> the graph input whose VALUE it depends on (Shape/Size cut the dependency)."""
        taint = {name: name for name in self.inputs if name not in self.init}
        for node in self.g.node:
            if node.op_type in _SHAPE_OF:
                continue
            src = next((taint[i] for i in node.input if i in taint), None)
            if src is not None:
                for o in node.output:
                    if o:
                        taint[o] = src
        return taint

    def taint_path(self, name: str, limit: int = 6) -> str:
        """'context_lens -> ReduceMax r -> Range x': how a value reaches `name`."""
        steps: list[str] = []
        cur = name
        while cur in self.producer and len(steps) < 50:
            node = self.producer[cur]
            steps.append(_node_label(node))
            cur = next(i for i in node.input if i in self.value_taint)
        steps.append(cur)
        steps.reverse()
        if len(steps) > limit:
            steps = [*steps[:2], "...", *steps[-(limit - 3):]]
        return " -> ".join(steps)


# ---- the rules ----------------------------------------------------------------------------------
@dataclass
class _Context:
    g: _Graph
    config: Mapping[str, Any] | None
    limits: Limits
    index_inputs: dict[str, str]  # role -> graph input name
    pools: list[str]
    outputs: dict[str, str]  # role -> graph output name (logits, new_kv)
    trt: str

    def cfg(self, key: str) -> int | None:
        if self.config is None or self.config.get(key) is None:
            return None
        return int(self.config[key])


_Problems = list[tuple[str | None, str]]


def _rule_ir_version(c: _Context) -> tuple[_Problems, str]:
    ir = c.g.model.ir_version
    if not ir or ir > MAX_IR_VERSION:
        return [(None, f"model.ir_version is {ir}; TensorRT {c.trt}'s parser (ONNX 1.16) reads "
                       f"IR versions up to {MAX_IR_VERSION}: save the model with ir_version "
                       f"{MAX_IR_VERSION}")], ""
    return [], f"IR version {ir}"


def _rule_opset(c: _Context) -> tuple[_Problems, str]:
    std = [o for o in c.g.model.opset_import if o.domain in _STANDARD_DOMAINS]
    if not std:
        return [(None, "the model imports no standard-domain opset")], ""
    problems: _Problems = []
    for o in std:
        if not MIN_OPSET <= o.version <= MAX_OPSET:
            problems.append((None, f"standard-domain opset {o.version}; TensorRT {c.trt} reads "
                                   f"opsets {MIN_OPSET} to {MAX_OPSET}"))
    others = [f"{o.domain} v{o.version}" for o in c.g.model.opset_import
              if o.domain not in _STANDARD_DOMAINS]
    extra = f" (also imports {', '.join(others)})" if others else ""
    return problems, f"opset {std[0].version}{extra}"


def _rule_operators(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    ops: set[str] = set()
    n = 0
    for node in _all_nodes(c.g.g):
        n += 1
        ops.add(node.op_type)
        if node.domain not in _STANDARD_DOMAINS:
            problems.append((_node_id(node), f"{_node_label(node)} is {node.domain}::"
                                             f"{node.op_type}, not a standard ONNX op: TensorRT "
                                             "has no importer for it (ORT-only ops belong to the "
                                             "cpu flavour)"))
        elif node.op_type not in TRT10_OPS:
            problems.append((_node_id(node), f"{_node_label(node)}: {node.op_type} is not on "
                                             "TensorRT 10's ONNX operator support list"))
    return problems, f"{n} nodes, {len(ops)} op types, all on TensorRT 10's list"


def _schema(op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, max(opset, 1), "")
    except onnx.defs.SchemaError:
        return None


def _formal(params: Sequence[onnx.defs.OpSchema.FormalParameter], i: int) -> str | None:
    if i < len(params):
        return params[i].type_str
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1].type_str
    return None


def _is_qdq_side(c: _Context, node: onnx.NodeProto) -> bool:
    """A Constant node whose quantized-type value only feeds Q/DQ (a zero point or DQ input)."""
    return node.op_type == "Constant" and all(
        n.op_type in ("QuantizeLinear", "DequantizeLinear")
        for n, _ in c.g.consumers.get(node.output[0], []))


def _rule_operator_types(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    checked = 0
    for node in c.g.g.node:
        support = TRT10_OPS.get(node.op_type)
        schema = _schema(node.op_type, c.g.opset) if node.domain in _STANDARD_DOMAINS else None
        if support is None or schema is None:
            continue  # the operators rule reports it
        wanted = _TYPE_CONSTRAINTS.get(node.op_type)
        if wanted is None:
            first = _formal(schema.inputs, 0) if schema.inputs else _formal(schema.outputs, 0)
            wanted = (first,) if first else ()
        tensors = [(f"input {i}", name) for i, name in enumerate(node.input)
                   if name and _formal(schema.inputs, i) in wanted]
        tensors += [(f"output {i}", name) for i, name in enumerate(node.output)
                    if name and _formal(schema.outputs, i) in wanted]
        bad: list[str] = []
        for where, name in tensors:
            t = c.g.trt_type(name)
            if t is None:
                continue
            checked += 1
            if t not in support.types and not (t in _QUANTIZED and _is_qdq_side(c, node)):
                bad.append(f"{where} '{name}' is {t}")
        if bad:
            quantized = sorted({b.rsplit(" ", 1)[1] for b in bad} & _QUANTIZED)
            why = (f" (TensorRT 10 has {'/'.join(quantized)} only on the quantized side of "
                   "Q/DQ)" if quantized else "")
            msg = (f"{_node_label(node)}: {', '.join(bad)}; TensorRT 10 supports "
                   f"{_types_text(support.types)} for {node.op_type}{why}")
            problems.append((_node_id(node), msg))
    io_types = set(_TRT_TYPE_NAMES.values()) - {"DOUBLE"}
    for kind, vis in (("input", c.g.g.input), ("output", c.g.g.output)):
        for vi in vis:
            t = c.g.trt_type(vi.name)
            if t is not None and t not in io_types:
                problems.append((vi.name, f"graph {kind} '{vi.name}' is {t}, not a TensorRT "
                                          "binding type"))
    return problems, f"{checked} typed node tensors checked (unknown types skipped)"


def _rule_constant_axes(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    for node in c.g.g.node:
        idx = _AXES_INPUT.get(node.op_type, 1 if node.op_type.startswith("Reduce") else None)
        if idx is None or idx >= len(node.input) or not node.input[idx]:
            continue
        name = node.input[idx]
        if not c.g.is_const(name):
            what = "axis" if node.op_type == "CumSum" else "axes"
            table = TRT10_OPS.get(node.op_type)
            note = f" (TensorRT: {table.restriction})" if table and table.restriction else ""
            problems.append((_node_id(node), f"{_node_label(node)} {what} {c.g.label(name)} is "
                                             f"not an initializer or Constant{note}"))
    return problems, "every axes input is an initializer or Constant"


def _rule_scatternd(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    for node in c.g.g.node:
        if node.op_type == "ScatterND":
            for a in node.attribute:
                if a.name == "reduction":
                    value = onnx.helper.get_attribute_value(a)
                    value = value.decode() if isinstance(value, bytes) else value
                    msg = (f"{_node_label(node)} has reduction={value!r}: TensorRT's ScatterND "
                           "importer rejects the attribute (any value, even 'none')")
                    problems.append((_node_id(node), msg))
    return problems, "no ScatterND has a reduction attribute"


def _qdq_nodes(c: _Context) -> Iterator[onnx.NodeProto]:
    return (n for n in c.g.g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def _volume(dims: Sequence[Dim] | None) -> int | None:
    if dims is None or any(not isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=object)) if dims else 1


def _rule_qdq_zero_point(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    unread = 0
    for node in _qdq_nodes(c):
        if len(node.input) < 3 or not node.input[2]:
            continue
        zp = node.input[2]
        if not c.g.is_const(zp):
            problems.append((_node_id(node), f"{_node_label(node)} zero point {c.g.label(zp)} "
                                             "is not a constant: TensorRT takes constant zero "
                                             "points of 0"))
            continue
        scale_vol = _volume(c.g.shapes.get(node.input[1]))
        zp_vol = _volume(c.g.shapes.get(zp))
        if scale_vol is not None and zp_vol is not None and scale_vol != zp_vol:
            problems.append((zp, f"{_node_label(node)} zero point '{zp}' has {zp_vol} values, "
                                 f"its scale {scale_vol}: TensorRT needs the same volume"))
        v = c.g.values(zp)
        if v is None:
            unread += 1
            continue
        nonzero = int(np.count_nonzero(np.asarray(v, np.float32)))
        if nonzero:
            problems.append((zp, f"{_node_label(node)} zero point '{zp}' has {nonzero} nonzero "
                                 f"value(s) of {v.size}: TensorRT quantizes symmetrically only "
                                 "(zero point 0)"))
    note = f"; {unread} zero point(s) unreadable (no external data)" if unread else ""
    return problems, f"every zero point is absent or constant zeros{note}"


def _positive_scale_problem(c: _Context, node: onnx.NodeProto, scale: str) -> str | None:
    v = c.g.values(scale)
    if v is None:
        return None
    f = np.asarray(v, np.float32)
    bad = {"zero": int(np.count_nonzero(f == 0)), "negative": int(np.count_nonzero(f < 0)),
           "NaN": int(np.count_nonzero(np.isnan(f)))}
    if not any(bad.values()):
        return None
    counts = ", ".join(f"{n} {k}" for k, n in bad.items() if n)
    return (f"{_node_label(node)} scale '{scale}' has {counts} value(s) of {f.size} (e.g. "
            "all-zero blocks whose scale rounded to 0): TensorRT rejects the graph, \"Scale "
            "coefficients must all be positive\"")


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _int4_dq_problems(c: _Context, node: onnx.NodeProto) -> list[tuple[str, str]]:
    """(subject, problem) for one INT4 DequantizeLinear."""
    x, scale = node.input[0], node.input[1]
    out: list[tuple[str, str]] = []
    if not c.g.is_const(x):
        src = ("a graph input" if x in c.g.inputs else
               f"produced by {_node_label(c.g.producer[x])}" if x in c.g.producer else "unknown")
        out.append((x, f"quantized input '{x}' is {src}: TensorRT's INT4 DequantizeLinear takes "
                       "an INT4 initializer directly (weight-only quantization)"))
    xd = c.g.shapes.get(x)
    if xd is not None and len(xd) != 2:
        out.append((x, f"quantized input '{x}' has rank {len(xd)}: INT4 weights must be 2-D"))
    if xd and isinstance(xd[-1], int) and xd[-1] % 2:
        out.append((x, f"quantized input '{x}' has an odd last dimension {xd[-1]}: TensorRT "
                       "packs INT4 in pairs"))
    if not c.g.is_const(scale):
        return [*out, (scale, f"scale {c.g.label(scale)} is not a constant")]
    if c.g.types.get(scale) not in _FLOATS:
        out.append((scale, f"scale '{scale}' is {c.g.trt_type(scale)}: TensorRT reads "
                           "FP32/FP16/BF16 scales"))
    sd = c.g.shapes[scale]
    if xd is None or len(xd) != 2 or not all(isinstance(d, int) for d in xd):
        return out
    if len(sd) != len(xd):
        return [*out, (scale, f"scale '{scale}' has shape {sd} for a weight {xd}: blocked INT4 "
                              "needs a scale of the weight's rank, one dimension blocked")]
    blocked = [i for i, (a, b) in enumerate(zip(xd, sd)) if a != b]
    if len(blocked) != 1:
        return [*out, (scale, f"weight {xd} and scale {sd} have {len(blocked)} blocked axes: "
                              "TensorRT takes exactly one")]
    ax = blocked[0]
    dim, nsc = int(xd[ax]), int(sd[ax])  # type: ignore[arg-type]
    if nsc == 0 or dim % nsc:
        return [*out, (scale, f"axis {ax} of '{x}' ({dim}) is not a whole number of the scale's "
                              f"{nsc} blocks: TensorRT infers the block size from the shapes "
                              "and rejects partial blocks")]
    inferred = dim // nsc
    attr = int(_attr(node, "block_size", 0))
    if attr != inferred:
        out.append((scale, f"block_size attribute {attr} but the shapes give {inferred} ({dim} "
                           f"/ {nsc}): TensorRT uses the shapes, ONNX Runtime the attribute"))
    axis = int(_attr(node, "axis", 1))
    if axis % len(xd) != ax:
        out.append((scale, f"axis attribute {axis} but the blocked axis is {ax}"))
    return out


def _rule_int4_dq(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    count = 0
    for node in _qdq_nodes(c):
        if node.op_type != "DequantizeLinear" or c.g.types.get(node.input[0]) not in (
                TensorProto.INT4, TensorProto.UINT4):
            continue
        count += 1
        problems += [(subject, f"{_node_label(node)}: {msg}")
                     for subject, msg in _int4_dq_problems(c, node)]
        if c.g.is_const(node.input[1]):
            msg = _positive_scale_problem(c, node, node.input[1])
            if msg:
                problems.append((node.input[1], msg))
    return problems, (f"{count} INT4 DequantizeLinear node(s) follow TensorRT's blocked rules"
                      if count else "no INT4 DequantizeLinear")


def _rule_int8_qdq(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    count = 0
    for node in _qdq_nodes(c):
        x, scale = node.input[0], node.input[1]
        if node.op_type == "DequantizeLinear":
            if c.g.types.get(x) not in (TensorProto.INT8, TensorProto.UINT8):
                continue
        else:  # QuantizeLinear to int8 (the zero point's type; uint8 without one)
            zp_type = c.g.types.get(node.input[2]) if len(node.input) > 2 and node.input[2] \
                else TensorProto.UINT8
            if zp_type not in (TensorProto.INT8, TensorProto.UINT8):
                continue
        count += 1
        lab = _node_label(node)
        sd = c.g.shapes.get(scale)
        vol = _volume(sd)
        weight = c.g.is_const(x)
        if sd is not None and vol != 1:
            if not weight:
                msg = (f"{lab}: scale '{scale}' has shape {sd} on the activation "
                       f"{c.g.label(x)}: TensorRT quantizes activations per tensor only (one "
                       "scale)")
                problems.append((_node_id(node), msg))
            elif len(sd) == 1:
                xd = c.g.shapes.get(x) or []
                axis = int(_attr(node, "axis", 1))
                k = xd[axis % len(xd)] if xd else None
                if isinstance(k, int) and vol is not None and k != vol:
                    problems.append((_node_id(node), f"{lab}: {vol} scales for {k} channels "
                                                     f"on axis {axis} of '{x}'"))
        if c.g.is_const(scale):
            msg = _positive_scale_problem(c, node, scale)
            if msg:
                problems.append((scale, msg))
    return problems, (f"{count} INT8 Q/DQ node(s): per-tensor activation scales, positive "
                      "constant scales" if count else "no INT8 QuantizeLinear/DequantizeLinear")


def _rule_pool_consumers(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    outputs = {o.name for o in c.g.g.output}
    for pool in c.pools:
        if pool not in c.g.inputs:
            continue  # kv-pool-layout reports it
        users = c.g.consumers.get(pool, [])
        if pool in outputs:
            problems.append((pool, f"pool '{pool}' is also a graph output"))
        if not users:
            problems.append((pool, f"pool '{pool}' is not read by the graph"))
        elif len(users) != 1 or users[0][0].op_type != "GatherND" or users[0][1] != 0:
            names = ", ".join(f"{_node_label(n)} (input {i})" for n, i in users)
            problems.append((pool, f"pool '{pool}' is read by {names}: its only consumer must be "
                                   "one GatherND (a Cast or Slice before it copies the whole "
                                   "pool every step)"))
    return problems, f"{len(c.pools)} pools, each read by one GatherND only"


def _dims_text(dims: Sequence[Dim] | None) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in (dims or [])) + "]"


def _rule_pool_layout(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    kvh, d = c.cfg("num_kv_heads"), c.cfg("head_dim")
    if not c.pools:
        return [(None, "no KV pool inputs found (manifest graph.pools, or inputs named "
                       "kv_pool.<layer>.key/value)")], ""
    expect = c.cfg("num_layers")
    if expect is not None and len(c.pools) != 2 * expect:
        problems.append((None, f"{len(c.pools)} pools for {expect} layers (expected "
                               f"{2 * expect})"))
    shapes: set[tuple[Dim, ...]] = set()
    for pool in c.pools:
        if pool not in c.g.inputs:
            problems.append((pool, f"pool '{pool}' is not a graph input"))
            continue
        t = c.g.trt_type(pool)
        if t not in ("FP32", "FP16"):
            problems.append((pool, f"pool '{pool}' is {t}: pools are FLOAT or FLOAT16"))
        dims = c.g.shapes.get(pool)
        if dims is None or len(dims) != 4:
            problems.append((pool, f"pool '{pool}' has shape {_dims_text(dims)}: expected "
                                   "[num_blocks, kv_heads, block_size, head_dim]"))
            continue
        shapes.add(tuple(dims))
        for i, (name, want) in enumerate((("kv_heads", kvh), ("head_dim", d))):
            got = dims[1 + 2 * i]
            if not isinstance(got, int):
                problems.append((pool, f"pool '{pool}' dim {1 + 2 * i} ({name}) is {got!r}, not "
                                       "a fixed size"))
            elif want is not None and got != want:
                problems.append((pool, f"pool '{pool}' dim {1 + 2 * i} ({name}) is {got}; the "
                                       f"config says {want}"))
        bs = dims[2]
        if isinstance(bs, int) and bs != c.limits.bs:
            problems.append((pool, f"pool '{pool}' block_size dim is {bs}; the manifest's "
                                   f"kv.block_size is {c.limits.bs}"))
        if dims[0] is None or dims[2] is None:
            problems.append((pool, f"pool '{pool}' has unnamed dynamic dims {_dims_text(dims)}"))
    if len(shapes) > 1:
        problems.append((None, f"pools differ in shape: {sorted(map(_dims_text, shapes))}"))
    shape = _dims_text(next(iter(shapes))) if shapes else "?"
    return problems, f"{len(c.pools)} pools {shape}"


def _rule_static_shapes(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    checked = 0
    taint = c.g.value_taint
    for node in c.g.g.node:
        for i in _SHAPE_INPUTS.get(node.op_type, ()):
            if i >= len(node.input) or not node.input[i]:
                continue
            checked += 1
            name = node.input[i]
            if name in taint:
                msg = (f"{_node_label(node)} shape input {i} '{name}' depends on the VALUE of "
                       f"graph input '{taint[name]}' ({c.g.taint_path(name)} -> "
                       f"{_node_label(node)}): shapes must come from Shape ops and constants")
                problems.append((_node_id(node), msg))
    return problems, f"{checked} shape inputs, all from initializers and Shape ops"


def _rule_index_inputs(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    present = [(role, name) for role, name in c.index_inputs.items() if name in c.g.inputs]
    for role, name in present:
        t = c.g.trt_type(name)
        if t != "INT32":
            problems.append((name, f"index input '{name}' ({role}) is {t}: the runtime binds "
                                   "int32 index arrays (DESIGN.md: all index inputs int32)"))
    return problems, f"{len(present)} index inputs, all INT32"


def _rule_volume(c: _Context) -> tuple[_Problems, str]:
    lim = c.limits
    s, t, b, n, bs = lim.max_seqs, lim.max_tokens, lim.max_blocks, lim.n, lim.bs
    kvh, d, heads = c.cfg("num_kv_heads"), c.cfg("head_dim"), c.cfg("num_heads")
    vocab, layers = c.cfg("vocab_size"), c.cfg("num_layers")
    tensors: list[tuple[str, list[int]]] = []  # (what, dims at the limits)
    if kvh and d:
        tensors.append(("KV pool [num_blocks, kvh, block_size, head_dim]",
                        [lim.num_blocks, kvh, bs, d]))
        tensors.append(("gathered past [S, kvh, B, block_size, head_dim]", [s, kvh, b, bs, d]))
        if heads:
            g = heads // kvh
            rows = g * t + (1 if g == 1 else 0)  # an MHA graph adds a zero query row
            tensors.append(("attention scores [S, kvh, g*T, B*block_size]",
                            [s, kvh, rows, b * bs]))
        if layers:
            tensors.append(("new_kv [layers, 2, S, T, kvh, head_dim]",
                            [layers, 2, s, t, kvh, d]))
    if vocab:
        tensors.append(("logits [N, vocab]", [n, vocab]))
    sym = lim.dims()
    for name, dims in c.g.shapes.items():  # every tensor whose inferred shape we can evaluate
        if dims and all(isinstance(x, int) or x in sym for x in dims):
            tensors.append((f"'{name}'", [x if isinstance(x, int) else sym[x]  # type: ignore
                                          for x in dims]))
    sized = [(int(np.prod(dims, dtype=object)), what, dims) for what, dims in tensors]
    problems: _Problems = [(what, f"{what} {dims} holds {vol:,} elements > {MAX_VOLUME:,}")
                           for vol, what, dims in sized if vol > MAX_VOLUME]
    where = f"S<={s}, T<={t}, B<={b}, N<={n}, num_blocks {lim.num_blocks}, block_size {bs}"
    if not sized:
        return problems, f"nothing to evaluate ({where})"
    vol, what, dims = max(sized, key=lambda x: x[0])
    skipped = "" if c.config else "; no config: only inferred shapes checked"
    return problems, (f"largest: {what} {dims} = {vol:,} elements, limit {MAX_VOLUME:,} "
                      f"({where}{skipped})")


def _rule_profiles(c: _Context) -> tuple[_Problems, str]:
    problems: _Problems = []
    lim = c.limits
    ranges = {"S": f"S in [1, {lim.max_seqs}]",
              "T": f"T = 1 (decode) and T in [2, {lim.max_tokens}] (prefill)",
              "B": f"B in [1, {lim.max_blocks}]", "N": f"N in [1, {lim.n}]"}
    kvh, d = c.cfg("num_kv_heads"), c.cfg("head_dim")
    vocab, layers = c.cfg("vocab_size"), c.cfg("num_layers")
    expected: dict[str, tuple[str, Sequence[str | int | None]]] = {}
    for role, name in c.index_inputs.items():
        expected[name] = ("input", _INDEX_DIMS[role])
    for pool in c.pools:  # kv_heads and head_dim: kv-pool-layout
        expected[pool] = ("input", ("num_blocks", None, "block_size", None))
    if "logits" in c.outputs:
        expected[c.outputs["logits"]] = ("output", ("N", vocab))
    if "new_kv" in c.outputs:
        expected[c.outputs["new_kv"]] = ("output", (layers, 2, "S", "T", kvh, d))
    declared = {**{i.name: i for i in c.g.g.output}, **c.g.inputs}
    for name, (kind, want) in expected.items():
        vi = declared.get(name)
        if vi is None:
            problems.append((name, f"graph {kind} '{name}' of the calling convention is missing"))
            continue
        if not vi.type.tensor_type.HasField("shape"):
            problems.append((name, f"graph {kind} '{name}' has no shape"))
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(want):
            problems.append((name, f"{kind} '{name}' has rank {len(dims)}, expected "
                                   f"{len(want)} {_dims_text(want)}"))
            continue
        for i, (dim, w) in enumerate(zip(dims, want)):
            where = f"{kind} '{name}' dim {i}"
            fixed = dim.dim_value if dim.HasField("dim_value") else None
            named = dim.dim_param if dim.HasField("dim_param") else None
            if w in ranges:  # varied by the runtime
                if fixed is not None:
                    problems.append((name, f"{where} is fixed at {fixed}, but the profiles vary "
                                           f"it: {ranges[w]}"))  # type: ignore[index]
                elif named != w:
                    got = f"named {named!r}" if named else "unnamed"
                    problems.append((name, f"{where} is {got}; the runtime's profiles vary it "
                                           f"as '{w}'"))
            elif w in ("num_blocks", "block_size"):  # fixed per engine / per manifest
                want_value = lim.bs if w == "block_size" else None
                if fixed is not None and want_value is not None and fixed != want_value:
                    problems.append((name, f"{where} ({w}) is {fixed}; the manifest says "
                                           f"{want_value}"))
                elif fixed is not None and w == "num_blocks":
                    problems.append((name, f"{where} (num_blocks) is fixed at {fixed}: the pool "
                                           "is sized on the device, so it must be symbolic"))
                elif fixed is None and not named:
                    problems.append((name, f"{where} ({w}) is an unnamed dynamic dim"))
            elif w is not None and fixed != w:  # the config's value
                got = fixed if fixed is not None else repr(named)
                problems.append((name, f"{where} is {got}; the config fixes it at {w}"))
    known = set(expected)
    for name in c.g.inputs:
        if name not in known and name not in c.g.init:
            problems.append((name, f"graph input '{name}' is not part of the calling convention "
                                   "(no profile covers it)"))
    return problems, (f"dynamic S/T/B/N as the profiles need (decode: T = 1, S in [1, "
                      f"{lim.max_seqs}]; prefill: T in [2, {lim.max_tokens}], S in [1, "
                      f"{lim.max_seqs}], B in [1, {lim.max_blocks}]; num_blocks fixed per "
                      "engine)")


_RULE_FUNCS = {
    "ir-version": _rule_ir_version, "opset": _rule_opset, "operators": _rule_operators,
    "operator-types": _rule_operator_types, "constant-axes": _rule_constant_axes,
    "scatternd-reduction": _rule_scatternd, "qdq-zero-point": _rule_qdq_zero_point,
    "int4-blocked-dq": _rule_int4_dq, "int8-qdq-scales": _rule_int8_qdq,
    "kv-pool-consumers": _rule_pool_consumers, "kv-pool-layout": _rule_pool_layout,
    "static-shapes": _rule_static_shapes, "index-inputs-int32": _rule_index_inputs,
    "tensor-volume": _rule_volume, "profile-dims": _rule_profiles,
}
assert list(_RULE_FUNCS) == list(RULES)


# ---- the API ------------------------------------------------------------------------------------
def check_model(model: onnx.ModelProto, *, base_dir: str | Path | None = None,
                config: Mapping[str, Any] | None = None, limits: Limits | None = None,
                inputs: Mapping[str, str] | None = None, pools: Sequence[str] | None = None,
                outputs: Mapping[str, str] | None = None, trt: str = DEFAULT_TRT,
                rules: Sequence[str] | None = None) -> list[Finding]:
    """Check one model against every rule (or `rules`), in RULES order: each failure as its own
    Finding, or one passing Finding per rule.

    base_dir: where the external data lives (needed to read Q/DQ scales and zero points).
    config: the manifest's `config` (num_kv_heads, num_heads, head_dim, vocab_size, num_layers);
    without it the rules needing it check what the graph alone shows. inputs / pools / outputs:
    the graph I/O names (the manifest's graph section); default: edgert's names."""
    trt = parse_trt_version(trt)
    unknown = set(rules or ()) - set(RULES)
    if unknown:
        raise ValueError(f"unknown rule(s) {sorted(unknown)}; rules: {', '.join(RULES)}")
    g = _Graph(model, Path(base_dir) if base_dir is not None else None)
    if pools is None:
        pools = [i.name for i in model.graph.input if _POOL_NAME.match(i.name)]
    index = {role: (inputs or {}).get(role, role) for role in INDEX_INPUTS}
    outs = dict(outputs) if outputs is not None else {"logits": "logits", "new_kv": "new_kv"}
    ctx = _Context(g, config, limits or Limits(), index, list(pools), outs, trt)
    findings: list[Finding] = []
    for name, func in _RULE_FUNCS.items():
        if rules is not None and name not in rules:
            continue
        problems, summary = func(ctx)
        if problems:
            findings += [Finding(name, False, msg, subject) for subject, msg in problems]
        else:
            findings.append(Finding(name, True, summary))
    return findings


def load_model(path: str | Path) -> onnx.ModelProto:
    """The graph without its weights (external data stays on disk)."""
    return onnx.load(str(path), load_external_data=False)


def check_bundle(bundle_path: str | Path, *, limits: Limits | None = None,
                 trt: str = DEFAULT_TRT, rules: Sequence[str] | None = None) -> list[Finding]:
    """Check a bundle's graph with its manifest's config, I/O names and kv.block_size. The
    manifest is validated (format, files present, sizes) but files are not hashed."""
    from edgert.bundle import Bundle

    bundle = Bundle.load(bundle_path, verify=False)
    bundle.require_paged("edgert check-trt")
    m = bundle.manifest
    limits = limits or Limits()
    if limits.block_size is None:
        limits = replace(limits, block_size=int(m["kv"].get("block_size", 16)))
    graph = m["graph"]
    pools = [p for pair in graph.get("pools", []) for p in pair] or None
    return check_model(load_model(bundle.model_path), base_dir=bundle.model_path.parent,
                       config=m["config"], limits=limits, inputs=graph.get("inputs"),
                       pools=pools, outputs=graph.get("outputs"), trt=trt, rules=rules)


def failures(findings: Sequence[Finding], rule: str | None = None) -> list[Finding]:
    return [f for f in findings if not f.ok and (rule is None or f.rule == rule)]


def format_text(findings: Sequence[Finding], title: str, max_per_rule: int = 20) -> str:
    """One line per rule (PASS/FAIL and what was checked), the failures indented below it."""
    lines = [title]
    width = max(len(r) for r in RULES)
    by_rule: dict[str, list[Finding]] = {}
    for f in findings:
        by_rule.setdefault(f.rule, []).append(f)
    failed = 0
    for rule, items in by_rule.items():
        bad = [f for f in items if not f.ok]
        if not bad:
            lines.append(f"PASS  {rule:<{width}}  {items[0].message}")
            continue
        failed += 1
        lines.append(f"FAIL  {rule:<{width}}  {RULES[rule]}: {len(bad)} problem(s)")
        lines += [f"        - {f.message}" for f in bad[:max_per_rule]]
        if len(bad) > max_per_rule:
            lines.append(f"        ... and {len(bad) - max_per_rule} more (--json lists all)")
    lines.append(f"{failed} of {len(by_rule)} rules failed" if failed
                 else f"all {len(by_rule)} rules passed")
    return "\n".join(lines)


def to_json(findings: Sequence[Finding], **header: Any) -> dict[str, Any]:
    rules = []
    for rule in RULES:
        items = [f for f in findings if f.rule == rule]
        if items:
            rules.append({"rule": rule, "description": RULES[rule],
                          "ok": all(f.ok for f in items),
                          "findings": [asdict(f) for f in items]})
    return {**header, "ok": all(f.ok for f in findings), "rules": rules}


def run_cli(args: argparse.Namespace) -> int:
    """`edgert check-trt`: 0 when every rule passes, 1 when one fails, 2 when the bundle cannot
    be read."""
    from google.protobuf.message import DecodeError

    from edgert.bundle import BundleError

    limits = Limits(max_seqs=args.max_seqs, max_tokens=args.max_tokens,
                    max_blocks=args.max_blocks, num_blocks=args.num_blocks,
                    block_size=args.block_size)
    try:
        findings = check_bundle(args.bundle, limits=limits, trt=args.trt)
    except (BundleError, OSError, DecodeError, KeyError, ValueError) as e:
        print(f"edgert check-trt: error: {e}", file=sys.stderr)
        return 2
    ok = all(f.ok for f in findings)
    if args.json:
        print(json.dumps(to_json(findings, bundle=str(args.bundle), trt=args.trt), indent=2))
    else:
        print(format_text(findings, f"TensorRT {args.trt} static check of {args.bundle} "
                                    "(no TensorRT run: necessary, not sufficient)"))
    return 0 if ok else 1
