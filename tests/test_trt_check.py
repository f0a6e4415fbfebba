"""export/trt_check.py: every rule catches a small hand-built graph that breaks it and passes one
that respects it; the exporter's own portable graphs (tiny random models: fp32, fp16, int8, int4)
pass end to end and a cpu-flavour one fails; `edgert check-trt` through a subprocess (exit
status 0 / 1 / 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from export.bundle_writer import write_bundle
from export.calibration import CalibConfig
from export.pipeline import load_source
from export.quantize import QuantConfig
from export.trt_check import (
    RULES,
    TRT10_OPS,
    Finding,
    Limits,
    check_bundle,
    check_model,
    failures,
    load_model,
)
from tests.tiny_models import VOCAB, make_tiny

F32, F16, I32, I64, I8 = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32,
                          TensorProto.INT64, TensorProto.INT8)
CONFIG = {"num_kv_heads": 2, "num_heads": 4, "head_dim": 16, "vocab_size": 128,
          "num_layers": 1}


# ---- hand-built graphs ----------------------------------------------------------------------
def vi(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    domain = attrs.pop("domain", "")
    return helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs)


def model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], inits: Sequence[TensorProto] = (),
          opset: int = 21, ir: int = 10, extra_opsets: dict[str, int] | None = None
          ) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = ir
    return m


def problems(m: onnx.ModelProto, rule: str, **kw) -> list[Finding]:
    found = check_model(m, rules=[rule], **kw)
    assert found and all(f.rule == rule for f in found)
    return failures(found)


def passes(m: onnx.ModelProto, rule: str, **kw) -> str:
    bad = problems(m, rule, **kw)
    assert not bad, [f.message for f in bad]
    return check_model(m, rules=[rule], **kw)[0].message


def one_problem(m: onnx.ModelProto, rule: str, *needles: str, **kw) -> Finding:
    bad = problems(m, rule, **kw)
    assert len(bad) == 1, [f.message for f in bad]
    for needle in needles:
        assert needle in bad[0].message, bad[0].message
    return bad[0]


def unary(op: str, elem: int = F32, **attrs) -> onnx.ModelProto:
    return model([node(op, ["x"], "y", **attrs)], [vi("x", elem, ["S", 8])],
                 [vi("y", elem, ["S", 8])])


# ---- the table ------------------------------------------------------------------------------
def test_the_embedded_operator_table():
    """The 10.0 list as embedded: the ops our graphs use, types parsed despite the doc's typos."""
    assert len(TRT10_OPS) == 149
    for op in ("MatMul", "Gemm", "GatherND", "ScatterND", "Softmax", "Where", "Range",
               "DequantizeLinear", "QuantizeLinear", "Split", "Cast"):
        assert op in TRT10_OPS
    assert TRT10_OPS["Split"].types == {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"}
    assert "" not in TRT10_OPS["Cast"].types and "INT8" not in TRT10_OPS["Cast"].types
    assert TRT10_OPS["DequantizeLinear"].types == {"INT8", "FP8", "INT4"}
    assert "initializer" in TRT10_OPS["Slice"].restriction
    assert "MatMulNBits" not in TRT10_OPS and "MatMulInteger" not in TRT10_OPS


# ---- rule 0: IR version and opset -----------------------------------------------------------
def test_ir_version():
    one_problem(_with_ir(unary("Relu"), 11), "ir-version", "ir_version is 11", "up to 10")
    passes(unary("Relu"), "ir-version")


def _with_ir(m: onnx.ModelProto, ir: int) -> onnx.ModelProto:
    m.ir_version = ir
    return m


def test_opset():
    m = model([node("Relu", ["x"], "y")], [vi("x", F32, [2])], [vi("y", F32, [2])], opset=22)
    one_problem(m, "opset", "opset 22", "9 to 21")
    m = model([node("Relu", ["x"], "y")], [vi("x", F32, [2])], [vi("y", F32, [2])], opset=8)
    one_problem(m, "opset", "opset 8")
    assert "opset 21" in passes(unary("Relu"), "opset")


# ---- rule 1: operators and their types ------------------------------------------------------
def test_operators_outside_the_standard_domain_or_the_list():
    mnb = node("MatMulNBits", ["x", "w", "s"], "y", domain="com.microsoft", K=8, N=8, bits=4,
               block_size=16)
    m = model([mnb], [vi("x", F32, ["S", 8])], [vi("y", F32, ["S", 8])],
              [init("w", np.zeros((8, 1, 8), np.uint8)), init("s", np.ones(8, np.float32))],
              extra_opsets={"com.microsoft": 1})
    f = one_problem(m, "operators", "MatMulNBits 'y'", "com.microsoft", "cpu flavour")
    assert f.subject == "y"
    m = model([node("BitShift", ["x", "x"], "y", direction="LEFT")], [vi("x", I32, [4])],
              [vi("y", I32, [4])])
    one_problem(m, "operators", "BitShift 'y'", "not on TensorRT 10's")
    assert "1 nodes" in passes(unary("Relu"), "operators")


def test_operator_types():
    """An int8 table through Gather (the portable int8 embedding's first op) is caught; float
    data, int32 indices, INT8 on the DQ side and tensors of unknown type pass."""
    table = init("table", np.zeros((16, 8), np.int8))
    ids = vi("ids", I32, ["S"])
    m = model([node("Gather", ["table", "ids"], "rows", axis=0),
               node("Cast", ["rows"], "y", to=F32)], [ids], [vi("y", F32, ["S", 8])], [table])
    bad = problems(m, "operator-types")
    assert [f.subject for f in bad] == ["rows", "y"]
    assert "input 0 'table' is INT8" in bad[0].message
    assert "only on the quantized side of Q/DQ" in bad[0].message
    assert "Cast 'y': input 0 'rows' is INT8" in bad[1].message

    m = model([node("Gather", ["table", "ids"], "y", axis=0)], [ids], [vi("y", F32, ["S", 8])],
              [init("table", np.zeros((16, 8), np.float32))])
    passes(m, "operator-types")
    # INT8 where TensorRT has it: the quantized input of a DequantizeLinear (here a Constant).
    q = helper.make_node("Constant", [], ["q"], name="q",
                         value=init("qv", np.ones((4, 8), np.int8)))
    m = model([q, node("DequantizeLinear", ["q", "s"], "w"), node("MatMul", ["x", "w"], "y")],
              [vi("x", F32, ["S", 4])], [vi("y", F32, ["S", 8])],
              [init("s", np.array(0.1, np.float32))])
    passes(m, "operator-types")
    # A type nobody can infer never fails.
    m = model([node("Relu", ["x"], "y")], [vi("x", TensorProto.UNDEFINED, None)],
              [vi("y", TensorProto.UNDEFINED, None)])
    passes(m, "operator-types")
    # Not a TensorRT type at all.
    bad = problems(unary("Relu", TensorProto.UINT16), "operator-types")
    assert [f.message for f in bad[1:]] == [
        "graph input 'x' is UINT16, not a TensorRT binding type",
        "graph output 'y' is UINT16, not a TensorRT binding type"]
    assert "Relu 'y': input 0 'x' is UINT16, output 0 'y' is UINT16" in bad[0].message


# ---- rule 2: restrictions of the table ------------------------------------------------------
def test_constant_axes():
    computed = [node("Shape", ["x"], "shp", start=1, end=2),
                node("Sub", ["shp", "one"], "ax")]
    inits = [init("one", np.array([1], np.int64))]
    for op in ("Unsqueeze", "ReduceSum"):
        m = model([*computed, node(op, ["x", "ax"], "y")], [vi("x", F32, ["S", 8])],
                  [vi("y", F32, None)], inits)
        one_problem(m, "constant-axes", f"{op} 'y' axes 'ax' (from Sub 'ax') is not an "
                    "initializer or Constant", "(TensorRT: `axes` must be")
    m = model([node("Slice", ["x", "st", "en", "axes_in"], "y")],
              [vi("x", F32, ["S", 8]), vi("axes_in", I64, [1])], [vi("y", F32, None)],
              [init("st", np.array([0], np.int64)), init("en", np.array([4], np.int64))])
    one_problem(m, "constant-axes", "Slice 'y' axes 'axes_in'")
    # initializer and Constant axes pass
    const = helper.make_node("Constant", [], ["c"], name="c", value_ints=[1])
    m = model([const, node("Unsqueeze", ["x", "c"], "u"), node("Squeeze", ["u", "ax1"], "y")],
              [vi("x", F32, ["S", 8])], [vi("y", F32, ["S", 8])],
              [init("ax1", np.array([1], np.int64))])
    passes(m, "constant-axes")


def test_scatternd_reduction():
    def scatter(**attrs) -> onnx.ModelProto:
        return model([node("ScatterND", ["d", "i", "u"], "y", **attrs)],
                     [vi("d", F32, [4, 8]), vi("i", I64, [2, 1]), vi("u", F32, [2, 8])],
                     [vi("y", F32, [4, 8])])

    one_problem(scatter(reduction="add"), "scatternd-reduction", "reduction='add'")
    one_problem(scatter(reduction="none"), "scatternd-reduction", "even 'none'")
    passes(scatter(), "scatternd-reduction")


def qdq(zp_value: np.ndarray | None, scale: np.ndarray) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear (an activation's Q/DQ)."""
    zp = [] if zp_value is None else ["zp"]
    inits = [init("s", scale)] + ([] if zp_value is None else [init("zp", zp_value)])
    return model([node("QuantizeLinear", ["x", "s", *zp], "q"),
                  node("DequantizeLinear", ["q", "s", *zp], "y")],
                 [vi("x", F32, ["S", 8])], [vi("y", F32, ["S", 8])], inits)


def test_qdq_zero_point():
    s = np.array(0.05, np.float32)
    bad = problems(qdq(np.array(3, np.int8), s), "qdq-zero-point")
    assert len(bad) == 2 and all("1 nonzero value(s)" in f.message and f.subject == "zp"
                                 for f in bad)
    # a zero point computed at run time cannot be shown to be 0
    m = model([node("Identity", ["z"], "zp"), node("DequantizeLinear", ["w", "s", "zp"], "y")],
              [vi("z", I8, [])], [vi("y", F32, [4, 8])],
              [init("w", np.ones((4, 8), np.int8)), init("s", s)])
    one_problem(m, "qdq-zero-point", "not a constant")
    passes(qdq(np.array(0, np.int8), s), "qdq-zero-point")
    passes(qdq(None, s), "qdq-zero-point")


# ---- rule 3: blocked INT4 DequantizeLinear ----------------------------------------------------
def int4_dq(k: int = 64, n: int = 32, scale_shape: tuple[int, ...] | None = None,
            block_size: int = 32, scale: np.ndarray | None = None, axis: int = 0,
            via: str | None = None, zp: np.ndarray | None = None) -> onnx.ModelProto:
    """x [S, k] @ DequantizeLinear(int4 [k, n], fp16 scales [k / block, n])."""
    codes = np.ones((k, n), ml_dtypes.int4)
    if scale is None:
        scale = np.full(scale_shape or (k // block_size, n), 0.01, np.float16)
    inits = [init("w.q", codes), init("w.s", scale)]
    nodes = []
    wq = "w.q"
    if via:  # something between the initializer and the DQ
        nodes.append(node(via, ["w.q"], "w.q2"))
        wq = "w.q2"
    extra = []
    if zp is not None:
        inits.append(init("w.z", zp))
        extra = ["w.z"]
    nodes += [node("DequantizeLinear", [wq, "w.s", *extra], "w", axis=axis,
                   block_size=block_size),
              node("Cast", ["w"], "wf", to=F32), node("MatMul", ["x", "wf"], "y")]
    return model(nodes, [vi("x", F32, ["S", k])], [vi("y", F32, ["S", n])], inits)


def test_int4_blocked_dequantize_linear():
    assert "1 INT4 DequantizeLinear" in passes(int4_dq(), "int4-blocked-dq")
    passes(int4_dq(k=112, block_size=28), "int4-blocked-dq")  # a divisor block, as exported
    one_problem(int4_dq(via="Identity"), "int4-blocked-dq", "'w.q2' is produced by Identity",
                "INT4 initializer directly")
    one_problem(int4_dq(scale_shape=(2, 32), block_size=16), "int4-blocked-dq",
                "block_size attribute 16 but the shapes give 32")
    one_problem(int4_dq(k=48, scale_shape=(5, 32), block_size=10), "int4-blocked-dq",
                "axis 0 of 'w.q' (48) is not a whole number of the scale's 5 blocks")
    one_problem(int4_dq(scale_shape=(2, 16)), "int4-blocked-dq", "2 blocked axes")
    one_problem(int4_dq(scale_shape=(32,)), "int4-blocked-dq", "of the weight's rank")
    one_problem(int4_dq(axis=1), "int4-blocked-dq", "axis attribute 1 but the blocked axis is 0")
    one_problem(int4_dq(n=33), "int4-blocked-dq", "odd last dimension 33")


def test_int4_scales_must_be_positive_read_from_external_data(tmp_path: Path):
    """An all-zero block whose float16 scale rounded to 0: the count and the tensor are named.
    The scale lives in the external data file; the check reads that one tensor and leaves the
    model without its data."""
    scale = np.full((2, 32), 0.01, np.float16)
    scale[1, :3] = np.float16(1e-9)  # rounds to 0 in float16
    path = tmp_path / "m.onnx"
    onnx.save_model(int4_dq(scale=scale), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    m = load_model(path)
    assert all(uses_external_data(t) for t in m.graph.initializer)
    f = one_problem(m, "int4-blocked-dq", "scale 'w.s' has 3 zero value(s) of 64",
                    "must all be positive", base_dir=tmp_path)
    assert f.subject == "w.s"
    assert not any(t.HasField("raw_data") for t in m.graph.initializer), "weights not loaded"
    # positive scales in external data pass; an INT4 zero point must be zero
    onnx.save_model(int4_dq(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    passes(load_model(path), "int4-blocked-dq", base_dir=tmp_path)
    m = int4_dq(zp=np.ones((2, 32), ml_dtypes.int4))
    one_problem(m, "qdq-zero-point", "zero point 'w.z' has 64 nonzero value(s)")
    passes(int4_dq(zp=np.zeros((2, 32), ml_dtypes.int4)), "qdq-zero-point")


# ---- rule 3b: int8 Q/DQ scales --------------------------------------------------------------
def weight_dq(scale: np.ndarray, axis: int = 1) -> onnx.ModelProto:
    return model([node("DequantizeLinear", ["w.q", "w.s"], "w", axis=axis),
                  node("MatMul", ["x", "w"], "y")], [vi("x", F32, ["S", 4])],
                 [vi("y", F32, ["S", 8])],
                 [init("w.q", np.ones((4, 8), np.int8)), init("w.s", scale)])


def test_int8_qdq_scales():
    per_channel = np.full(8, 0.1, np.float32)
    bad = problems(qdq(np.zeros(8, np.int8), per_channel), "int8-qdq-scales")
    assert len(bad) == 2 and all("per tensor only" in f.message for f in bad)
    assert "2 INT8 Q/DQ" in passes(qdq(np.array(0, np.int8), np.array(0.1, np.float32)),
                                   "int8-qdq-scales")
    passes(weight_dq(per_channel), "int8-qdq-scales")  # per channel on a constant weight
    one_problem(weight_dq(np.full(4, 0.1, np.float32)), "int8-qdq-scales",
                "4 scales for 8 channels on axis 1")
    neg = per_channel.copy()
    neg[2] = -0.1
    one_problem(weight_dq(neg), "int8-qdq-scales", "1 negative value(s) of 8")


# ---- rule 4: the pools ------------------------------------------------------------------------
def pool_graph(via: str | None = None, elem: int = F32, dims: list | None = None,
               two_readers: bool = False) -> onnx.ModelProto:
    dims = dims or ["num_blocks", 2, "block_size", 16]
    nodes, src = [], "kv_pool.0.key"
    if via == "Cast":
        nodes.append(node("Cast", [src], "pool_f", to=F32))
        src = "pool_f"
    nodes.append(node("GatherND", [src, "idx"], "past"))
    outs = [vi("past", F32, None)]
    if two_readers:
        nodes.append(node("GatherND", ["kv_pool.0.key", "idx"], "past2"))
        outs.append(vi("past2", F32, None))
    return model(nodes, [vi("kv_pool.0.key", elem, dims), vi("idx", I64, ["S", 2, "B", 2])],
                 outs)


def test_pool_only_consumer_is_its_gathernd():
    one_problem(pool_graph(via="Cast"), "kv-pool-consumers",
                "read by Cast 'pool_f' (input 0)", "copies the whole pool")
    one_problem(pool_graph(two_readers=True), "kv-pool-consumers", "GatherND 'past2'")
    assert "1 pools" in passes(pool_graph(), "kv-pool-consumers")


def test_pool_layout():
    kw = dict(config={**CONFIG, "num_layers": None})
    assert "[num_blocks, 2, block_size, 16]" in passes(pool_graph(), "kv-pool-layout", **kw)
    passes(pool_graph(elem=F16), "kv-pool-layout", **kw)
    one_problem(pool_graph(elem=TensorProto.DOUBLE), "kv-pool-layout", "is DOUBLE", **kw)
    one_problem(pool_graph(dims=["num_blocks", 4, "block_size", 16]), "kv-pool-layout",
                "dim 1 (kv_heads) is 4; the config says 2", **kw)
    one_problem(pool_graph(dims=["num_blocks", 2, 16]), "kv-pool-layout", "has shape", **kw)
    one_problem(pool_graph(dims=["num_blocks", 2, 32, 16]), "kv-pool-layout",
                "block_size dim is 32; the manifest's kv.block_size is 16", **kw)


# ---- rule 5: shapes from shapes, int32 indices ------------------------------------------------
def range_graph(limit_from_value: bool) -> onnx.ModelProto:
    """Range(0, n, 1): n the longest context (a VALUE) or the block table's width (a SHAPE)."""
    if limit_from_value:
        nodes = [node("ReduceMax", ["context_lens", "ax0"], "n", keepdims=0)]
    else:
        nodes = [node("Shape", ["block_tables"], "shp", start=1, end=2),
                 node("Cast", ["shp"], "shp32", to=I32), node("Squeeze", ["shp32"], "n")]
    nodes += [node("Range", ["zero", "n", "one"], "keys"),
              node("Unsqueeze", ["keys", "ax0"], "keys2"),
              node("Reshape", ["block_tables", "flat"], "y")]
    return model(nodes, [vi("context_lens", I32, ["S"]), vi("block_tables", I32, ["S", "B"])],
                 [vi("keys2", I32, None), vi("y", I32, None)],
                 [init("zero", np.array(0, np.int32)), init("one", np.array(1, np.int32)),
                  init("ax0", np.array([0], np.int64)), init("flat", np.array([-1], np.int64))])


def test_shapes_come_from_shape_ops_not_values():
    f = one_problem(range_graph(True), "static-shapes", "Range 'keys' shape input 1 'n'",
                    "VALUE of graph input 'context_lens'",
                    "context_lens -> ReduceMax 'n' -> Range 'keys'")
    assert f.subject == "keys"
    passes(range_graph(False), "static-shapes")
    # a value mixed into a Reshape's shape through Concat is caught too
    m = model([node("Shape", ["x"], "s0", start=0, end=1), node("Cast", ["t"], "t64", to=I64),
               node("Concat", ["s0", "t64"], "shape", axis=0),
               node("Reshape", ["x", "shape"], "y")],
              [vi("x", F32, ["S", 8]), vi("t", I32, [1])], [vi("y", F32, None)])
    one_problem(m, "static-shapes", "Reshape 'y' shape input 1 'shape'", "graph input 't'")


def test_index_inputs_are_int32():
    def graph(table_type: int) -> onnx.ModelProto:
        return model([node("Identity", ["block_tables"], "y")],
                     [vi("block_tables", table_type, ["S", "B"])],
                     [vi("y", table_type, ["S", "B"])])

    one_problem(graph(I64), "index-inputs-int32", "'block_tables' (block_tables) is INT64")
    passes(graph(I32), "index-inputs-int32")


# ---- rule 6: volumes --------------------------------------------------------------------------
def test_tensor_volume():
    m = unary("Relu")
    big = {**CONFIG, "vocab_size": 1_000_000}
    one_problem(m, "tensor-volume", "logits [N, vocab] [4096, 1000000] holds 4,096,000,000",
                config=big)
    msg = passes(m, "tensor-volume", config=CONFIG)
    # g = 2: scores [16, 2, 2 * 256, 512 * 16] is the largest
    assert "largest: attention scores" in msg and "[16, 2, 512, 8192] = 134,217,728" in msg
    assert "limit 2,147,483,647" in msg
    # the runtime's limits are parameters: 64 blocks of 16 per row
    msg = passes(m, "tensor-volume", config=CONFIG, limits=Limits(max_blocks=64))
    assert "[16, 2, 512, 1024]" in msg
    one_problem(m, "tensor-volume", "attention scores", config=CONFIG,
                limits=Limits(max_blocks=8192, block_size=64))
    # any tensor whose shape uses only S/T/B/N: an [S, T, 10^6] input at S=16, T=256
    m = model([node("Relu", ["x"], "y")], [vi("x", F32, ["S", "T", 1_000_000])],
              [vi("y", F32, ["S", "T", 1_000_000])])
    bad = problems(m, "tensor-volume")
    assert {f.subject for f in bad} == {"'x'", "'y'"}
    assert "[16, 256, 1000000] holds 4,096,000,000 elements" in bad[0].message


# ---- rule 7: profiles -------------------------------------------------------------------------
def io_graph(overrides: dict[str, list] | None = None, extra: bool = False) -> onnx.ModelProto:
    """Every input of the calling convention, consumed by one Identity each, and the two
    outputs; `overrides` replaces an input's (or the logits') dims."""
    dims = {"input_ids": ["S", "T"], "positions": ["S", "T"], "query_lens": ["S"],
            "context_lens": ["S"], "block_tables": ["S", "B"], "logits_indices": ["N"],
            "kv_pool.0.key": ["num_blocks", 2, "block_size", 16],
            "kv_pool.0.value": ["num_blocks", 2, "block_size", 16]}
    overrides = dict(overrides or {})
    logits = overrides.pop("logits", ["N", 128])
    dims.update(overrides)
    if extra:
        dims["temperature"] = [1]
    inputs = [vi(n, F32 if "pool" in n or n == "temperature" else I32, d)
              for n, d in dims.items()]
    nodes = [node("Identity", [n], f"{n}.out") for n in dims]
    outputs = [vi(f"{n}.out", F32, None) for n in dims]
    nodes.append(node("Identity", ["input_ids"], "logits"))
    outputs.append(vi("logits", F32, logits))
    nodes.append(node("Identity", ["input_ids"], "new_kv"))
    outputs.append(vi("new_kv", F32, [1, 2, "S", "T", 2, 16]))
    return model(nodes, inputs, outputs)


def test_profile_dims():
    msg = passes(io_graph(), "profile-dims", config=CONFIG)
    assert "decode: T = 1" in msg and "prefill: T in [2, 256]" in msg
    one_problem(io_graph({"input_ids": ["S", 1]}), "profile-dims",
                "input 'input_ids' dim 1 is fixed at 1", "T in [2, 256] (prefill)",
                config=CONFIG)
    one_problem(io_graph({"block_tables": ["batch", "B"]}), "profile-dims",
                "'block_tables' dim 0 is named 'batch'", "as 'S'", config=CONFIG)
    one_problem(io_graph({"kv_pool.0.key": [4096, 2, "block_size", 16]}), "profile-dims",
                "(num_blocks) is fixed at 4096", config=CONFIG)
    one_problem(io_graph({"logits": ["N", 100]}), "profile-dims",
                "output 'logits' dim 1 is 100; the config fixes it at 128", config=CONFIG)
    one_problem(io_graph(extra=True), "profile-dims", "'temperature' is not part of the calling",
                config=CONFIG)
    # a fixed block_size dim equal to the manifest's is fine
    passes(io_graph({"kv_pool.0.key": ["num_blocks", 2, 16, 16]}), "profile-dims",
           config=CONFIG)


# ---- the exporter's graphs (tiny random models) ---------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Bundles of a tiny GQA llama (tied) and an MHA llama: fp32, fp16, portable int8 and int4
    (with the default int8 embedding table, and with an fp32 one), and a cpu-flavour int4 that
    TensorRT must refuse."""
    root = tmp_path_factory.mktemp("trt")
    rng = np.random.default_rng(0)
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"w{i}" for i in rng.integers(0, VOCAB, size=2000)))
    cc = CalibConfig(source=str(calib), samples=8, seqlen=64)
    ckpt = load_source(make_tiny("llama", root / "hf", tie=True)[1])
    mha = load_source(make_tiny("llama-mha", root / "hf-mha")[1])
    out = {"fp32": write_bundle(ckpt, root / "fp32", progress=False),
           "fp32-mha": write_bundle(mha, root / "fp32-mha", progress=False),
           "fp16": write_bundle(ckpt, root / "fp16", progress=False,
                                quant=QuantConfig(precision="fp16")),
           "int4-cpu": write_bundle(ckpt, root / "int4-cpu", progress=False, quant=QuantConfig(
               precision="int4", flavour="cpu", calib=cc))}
    for p in ("int8", "int4"):
        for emb in (None, "fp32"):
            key = p + ("-fp32-table" if emb else "")
            out[key] = write_bundle(ckpt, root / key, progress=False, quant=QuantConfig(
                precision=p, flavour="portable", embedding=emb, calib=cc))
    return out


def _failed(findings: list[Finding]) -> list[str]:
    return [f"{f.rule}: {f.message}" for f in failures(findings)]


@pytest.mark.parametrize("key", ["fp32", "fp32-mha", "fp16", "int8", "int4",
                                 "int8-fp32-table", "int4-fp32-table"])
def test_exported_portable_graphs_pass(tiny, key):
    """The float graphs (GQA and MHA, whose zero query row takes another Slice; fp32 and fp16
    with its fp32 islands) and the quantized projections (W8A8 Q/DQ, blocked INT4
    DequantizeLinear) pass every rule. The default int8 embedding table is dequantized before
    its Gather, because TensorRT 10 has no INT8 Gather: INT8 lives only inside Q/DQ pairs."""
    findings = check_bundle(tiny[key])
    assert [f.rule for f in findings] == list(RULES), "one passing finding per rule"
    assert not _failed(findings)


# ---- the command ------------------------------------------------------------------------------
def edgert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgert", "check-trt", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli(tiny, tmp_path):
    p = edgert("--help")
    assert p.returncode == 0 and "without TensorRT" in p.stdout and "--trt" in p.stdout

    p = edgert(str(tiny["fp32"]), "--trt", "10.3")
    assert p.returncode == 0, p.stderr
    assert "PASS  operators" in p.stdout and f"all {len(RULES)} rules passed" in p.stdout

    # the cpu flavour is ORT's: MatMulNBits (com.microsoft), a UINT8 table Gather, opset 24
    p = edgert(str(tiny["int4-cpu"]), "--json")
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is False and report["trt"] == "10.3"
    bad = {r["rule"]: r["findings"] for r in report["rules"] if not r["ok"]}
    assert sorted(bad) == ["operator-types", "operators", "opset"]
    assert any("MatMulNBits" in f["message"] for f in bad["operators"])
    assert any(f["message"].startswith("Gather") for f in bad["operator-types"])

    p = edgert(str(tiny["int4-cpu"]))
    assert p.returncode == 1 and "FAIL  operators" in p.stdout

    p = edgert(str(tmp_path / "missing"))
    assert p.returncode == 2 and "not a bundle directory" in p.stderr
    p = edgert(str(tiny["fp32"]), "--trt", "8.6")
    assert p.returncode == 2 and "only TensorRT 10.x" in p.stderr
