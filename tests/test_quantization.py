"""Quantized export: the grids, GPTQ, every operator layout against numpy, quantized bundles of
tiny models against the float graph of their own dequantized weights, the batcher on quantized
bundles, and the quality gates on SmolLM2-135M (perplexity over >= 8k held-out tokens, relative
to the fp32 bundle)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgert.bundle import Bundle
from edgert.engine import LLM
from edgert.sampling_params import SamplingParams
from edgert.tools.evaluate import (
    CachedScorer,
    EvalConfig,
    GraphScorer,
    bundle_size,
    bundle_tokens,
    evaluate_tokens,
    format_summary,
)
from export.bundle_writer import write_bundle
from export.calibration import CalibConfig, calibrate
from export.checkpoint import Checkpoint
from export.gptq import gptq
from export.graph import _Builder
from export.pipeline import load_source
from export.quant_formats import Grid, choose_block, rtn
from export.quant_graph import QuantOps
from export.quantize import PORTABLE_INT8_ORT_CONFIG, QuantConfig, build_quantized
from tests.paged_runner import PagedRunner
from tests.test_fp16_graph import FP16_LOGIT_RTOL
from tests.tiny_models import VOCAB, make_tiny

RNG = np.random.default_rng(1234)


# ---- grids ----------------------------------------------------------------------------------

def test_block_sizes_for_widths_that_are_not_a_multiple_of_the_group():
    assert choose_block(576, 128, "portable") == 96  # 576 = 4.5 x 128: largest divisor <= 128
    assert choose_block(576, 64, "portable") == 64
    assert choose_block(576, 32, "portable") == 32
    assert choose_block(1536, 128, "portable") == 128
    assert choose_block(112, 32, "portable") == 28
    assert choose_block(576, 128, "cpu") == 128  # padded to 640 instead
    with pytest.raises(ValueError, match="no divisor"):
        choose_block(577, 128, "portable")  # prime: refused, never silently skipped
    with pytest.raises(ValueError, match="power of two"):
        choose_block(576, 96, "cpu")


def _q4_1_weights(n: int, k: int, block: int = 32) -> np.ndarray:
    """Weights exactly on llama.cpp's Q4_1 grid: fp16 scale d and minimum m per block, every
    block using codes 0 and 15 (as a Q4_1 block built from its own min/max does)."""
    q = RNG.integers(0, 16, size=(n, k // block, block)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = RNG.uniform(0.001, 0.02, size=(n, k // block, 1)).astype(np.float16).astype(np.float32)
    m = RNG.uniform(-0.2, 0.0, size=(n, k // block, 1)).astype(np.float16).astype(np.float32)
    return (q * d + m).reshape(n, k)


def test_float_minimum_reproduces_q4_1_exactly():
    w = _q4_1_weights(48, 576)
    grid = Grid(4, 32, symmetric=False, zero_point="float")
    assert np.array_equal(rtn("w", w, grid).dequantize(), w)
    x = RNG.normal(size=(512, 576)).astype(np.float32)
    assert np.array_equal(gptq("w", w, x.T @ x, grid).dequantize(), w)
    # integer zero points cannot hold the minimum: the same weights lose precision
    err = np.abs(rtn("w", w, replace(grid, zero_point="int")).dequantize() - w).max()
    assert err > 1e-4


def test_codes_stay_on_their_grids():
    w = RNG.normal(size=(64, 200)).astype(np.float32)
    for grid, lo, hi in [(Grid(8, None), -127, 127), (Grid(4, 32), -8, 7),
                         (Grid(4, 32, False, "int"), 0, 15), (Grid(4, 32, False, "float"), 0, 15)]:
        qw = rtn("w", w, grid)
        assert qw.codes.min() >= lo and qw.codes.max() <= hi
        assert qw.k_padded == (200 if grid.block is None else 224)  # 200 -> 7 blocks of 32
        assert qw.dequantize().shape == w.shape
        # fp16 scales: exactly representable
        if grid.scale_dtype == "float16":
            assert np.array_equal(qw.scale.astype(np.float16).astype(np.float32), qw.scale)


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    """GPTQ minimises ||X (W - Wq)^T|| on correlated inputs, RTN only ||W - Wq||."""
    k = 256
    mix = RNG.normal(size=(k, k)).astype(np.float32) / np.sqrt(k)
    x = (RNG.normal(size=(4096, k)) @ mix * RNG.uniform(0.2, 3, size=k)).astype(np.float32)
    w = RNG.normal(size=(96, k)).astype(np.float32)
    grid = Grid(4, 32)

    def out_err(qw):
        return float(np.linalg.norm(x @ (w - qw.dequantize()).T))

    e_rtn, e_gptq = out_err(rtn("w", w, grid)), out_err(gptq("w", w, x.T @ x, grid))
    print(f"output error: rtn {e_rtn:.1f}, gptq {e_gptq:.1f}")
    assert e_gptq < 0.8 * e_rtn


# ---- operator layouts against numpy -----------------------------------------------------------

def _run(b: _Builder, inputs: dict[str, np.ndarray], out: str,
         config: dict[str, str] | None = None) -> np.ndarray:
    graph = helper.make_graph(
        b.nodes, "t",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape))
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run([out], inputs)[0]


@pytest.mark.parametrize("zero_point", [None, "int", "float"])
@pytest.mark.parametrize("block", [32, 128])
def test_matmulnbits_layout(zero_point, block):
    """K = 576 (not a multiple of 128: padded), 3-D and 2-D activations, fp32 compute."""
    w = RNG.normal(size=(80, 576)).astype(np.float32)
    grid = Grid(4, block, zero_point is None, zero_point)
    qw = rtn("w", w, grid)
    for shape in [(2, 3, 576), (5, 576)]:
        x = RNG.normal(size=shape).astype(np.float32)
        b = _Builder()
        y = QuantOps(b, accuracy_level=0).int4_matmulnbits("x", qw, "w", len(shape))
        got = _run(b, {"x": x}, y)
        want = x @ qw.dequantize().T
        assert np.abs(got - want).max() <= 2e-4 * np.abs(want).max()


def test_blocked_dequantize_linear_layout():
    """portable int4: opset-21 blocked DequantizeLinear, block 96 for K = 576 at group 128."""
    w = RNG.normal(size=(40, 576)).astype(np.float32)
    qw = rtn("w", w, Grid(4, choose_block(576, 128, "portable")))
    assert qw.block == 96 and qw.k_padded == 576
    x = RNG.normal(size=(2, 3, 576)).astype(np.float32)
    b = _Builder()
    got = _run(b, {"x": x}, QuantOps(b).int4_dq("x", qw, "w"))
    want = x @ qw.dequantize().T
    # float16 scales: DequantizeLinear's output is float16, so scale * code is rounded to
    # 11 significant bits before the Cast (what TensorRT computes too)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def _per_row_reference(x: np.ndarray, qw) -> np.ndarray:
    s = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-20) * np.float32(1 / 127)
    q = np.round(x / s)
    return (q @ qw.codes.astype(np.float32).T) * s * qw.scale[:, 0]


def test_int8_dynamic_rows_matches_numpy_and_rows_are_independent():
    """Per-row activation scales: a row's result is bit-identical whatever shares its batch
    (a huge row, a zero padding row); a per-tensor scale would fail this."""
    w = RNG.normal(size=(64, 96)).astype(np.float32)
    qw = rtn("w", w, Grid(8, None, scale_dtype="float32"))
    b = _Builder()
    ops = QuantOps(b)
    wq, ws = ops.int8_weight_u8(qw, "w")
    y = ops.int8_dynamic_rows("x", wq, ws)
    row = RNG.normal(size=(1, 1, 96)).astype(np.float32)
    alone = _run(b, {"x": row}, y)
    assert np.allclose(alone, _per_row_reference(row, qw), rtol=1e-5, atol=1e-5)
    crowd = np.concatenate([row, 1e3 * RNG.normal(size=(1, 1, 96)).astype(np.float32),
                            np.zeros((1, 1, 96), np.float32)], axis=0)
    together = _run(b, {"x": crowd}, y)
    assert np.array_equal(together[0], alone[0])
    assert np.all(together[2] == 0)


def test_int8_static_and_blocked_table():
    w = RNG.normal(size=(64, 96)).astype(np.float32)
    x = RNG.normal(size=(1, 4, 96)).astype(np.float32)
    qw = rtn("w", w, Grid(8, None, scale_dtype="float32"))
    b = _Builder()
    ops = QuantOps(b)
    wq, ws = ops.int8_weight_s8(qw, "w")
    scale = float(np.abs(x).max() / 127)
    y = ops.int8_static("x", wq, ws, scale)
    want = (np.round(x / scale) * scale) @ qw.dequantize().T
    got = _run(b, {"x": x}, y, PORTABLE_INT8_ORT_CONFIG)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # Why the manifest carries that setting: ORT's own Q/DQ fusion runs this as a u8s8 GEMM,
    # whose int16 pair sums saturate on AVX2 without VNNI: some outputs come out wrong.
    fused = _run(b, {"x": x}, y)
    print(f"ORT's fused Q/DQ: max error {np.abs(fused - want).max():.3f} of "
          f"{np.abs(want).max():.1f}")

    table = rtn("t", w, Grid(8, 32, scale_dtype="float16"))  # Q8_0's grid
    b = _Builder()
    ops = QuantOps(b)
    t = ops.int8_blocked_table(table, "t")
    ids = np.array([[3, 0, 63]], np.int64)
    b.nodes.append(helper.make_node("Cast", ["idsf"], ["ids"], to=TensorProto.INT64))
    got = _run(b, {"idsf": ids.astype(np.float32)}, ops.int8_blocked_gather(t, "ids", 96))
    assert np.array_equal(got[0], table.dequantize()[ids[0]])
    b = _Builder()
    ops = QuantOps(b)
    t = ops.int8_blocked_table(table, "t")
    got = _run(b, {"x": x[0]}, ops.int8_blocked_matmul("x", t))
    want = x[0] @ table.dequantize().T
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # int8 activations per block


# ---- tiny models: quantized graph == float graph of its own dequantized weights --------------

def _dequantized_checkpoint(ckpt: Checkpoint, weights: dict, fp16_dq: bool) -> Checkpoint:
    """The checkpoint whose float weights are exactly what the quantized graph multiplies by
    (`fp16_dq`: a DequantizeLinear with float16 scales outputs scale * code in float16)."""
    cfg = ckpt.config
    w = dict(ckpt.weights)
    d, nh, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    for name, qw in weights.items():
        deq = qw.dequantize()
        if fp16_dq:
            deq = deq.astype(np.float16).astype(np.float32)
        if name.endswith("qkv_proj.weight"):
            p = name[: -len("qkv_proj.weight")]
            q, k, v = np.split(deq, [nh * d, nh * d + kvh * d])
            w[p + "q_proj.weight"], w[p + "k_proj.weight"], w[p + "v_proj.weight"] = q, k, v
        elif name.endswith("gate_up_proj.weight"):
            p = name[: -len("gate_up_proj.weight")]
            w[p + "gate_proj.weight"], w[p + "up_proj.weight"] = np.split(deq, 2)
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            raise AssertionError("a tied head is quantized through the embedding table")
        else:
            w[name] = deq
    return replace(ckpt, weights=w)


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyq")
    out = {}
    for arch, tie in (("llama", True), ("qwen2", False), ("gemma2", True),
                      ("phi3-partial", False), ("qwen3", False)):
        _, path = make_tiny(arch, root / arch, tie=tie)
        out[arch] = load_source(path)
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"w{i}" for i in RNG.integers(0, VOCAB, size=4000)))
    return out, str(calib)


def _logits(ckpt_or_bundle, ids: list[int]) -> np.ndarray:
    bundle = ckpt_or_bundle
    runner = PagedRunner(bundle, block_size=4, num_blocks=40)
    first = runner.run([(0, ids[:20])])[0]
    rest = [runner.run([(0, [t])])[0] for t in ids[20:]]
    return np.concatenate([first, *rest])


WEIGHT_ONLY = [
    ("int4-sym-g32-cpu", dict(precision="int4", flavour="cpu")),
    ("int4-asym-float-g128-cpu", dict(precision="int4", flavour="cpu", symmetric=False,
                                      group_size=128)),
    ("int4-asym-int-g32-cpu", dict(precision="int4", flavour="cpu", symmetric=False,
                                   zero_point="int")),
    ("int4-sym-g32-portable", dict(precision="int4", flavour="portable")),
    ("int4-sym-g128-portable", dict(precision="int4", flavour="portable", group_size=128)),
    ("fp16", dict(precision="fp16")),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3-partial", "qwen3"])
@pytest.mark.parametrize("label,kw", WEIGHT_ONLY, ids=[c[0] for c in WEIGHT_ONLY])
def test_weight_only_graph_equals_its_dequantized_weights(arch, label, kw, tiny_ckpts,
                                                          tmp_path):
    """Every projection's codes, scales, zero points and block layout (hidden 64 and
    intermediate 112: padded blocks in cpu, divisor blocks in portable) through prefill and
    decode on the paged pool. fp32 compute in MatMulNBits (accuracy level 0) so the comparison
    is exact up to float summation order; the cpu graphs' fused RoPE (RotaryEmbedding on the
    heads-first projection, after qwen3's q/k norms, partial in phi3) and fused norms (each
    residual Add and the RMSNorm after it as one SkipSimplifiedLayerNormalization, around
    gemma2's sandwich norms too) against the reference's elementwise ones. The portable
    graphs have float16 activations: their reference is the float16 graph of the same
    dequantized weights (exact too). fp16 itself
    is the float16 graph: against the fp32 graph of its float16-rounded weights, within the
    float16 activations' rounding (FP16_LOGIT_RTOL, derived in tests/test_fp16_graph.py)."""
    ckpts, calib = tiny_ckpts
    ckpt = ckpts[arch]
    qcfg = QuantConfig(**kw, embedding="fp32", accuracy_level=0,
                       calib=CalibConfig(source=calib, samples=8, seqlen=64))
    qg = build_quantized(ckpt, qcfg)
    fused = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in qg.model.graph.node)
    # every norm but the first layer's (after the embedding) and the final one (after a Gather);
    # gemma2's output norms too where an Add ends the projection (int4's float minimum)
    layers = ckpt.config.num_layers
    assert fused >= 2 * layers - 1 if kw.get("flavour") == "cpu" else fused == 0
    bundle = Bundle.load(write_bundle(ckpt, tmp_path / "q", progress=False, quant=qcfg,
                                      calibration=qg.calibration))
    fp16_dq = kw.get("flavour") == "portable" and kw["precision"] == "int4"
    deq = _dequantized_checkpoint(ckpt, qg.weights, fp16_dq)
    if kw["precision"] == "fp16":  # every projection stored as float16
        deq = replace(ckpt, weights={
            k: v.astype(np.float16).astype(np.float32) if k.endswith("proj.weight") else v
            for k, v in ckpt.weights.items()})
    float16 = qcfg.activation_dtype == "float16" and kw["precision"] != "fp16"
    ref = Bundle.load(write_bundle(deq, tmp_path / "r", progress=False, quant=QuantConfig(
        precision="fp16", embedding="fp32") if float16 else None))
    ids = [int(t) for t in RNG.integers(0, VOCAB, size=30)]
    got, want = _logits(bundle, ids), _logits(ref, ids)
    diff = float(np.abs(got - want).max())
    print(f"{arch} {label}: max |logit diff| {diff:.2e}")
    rtol = FP16_LOGIT_RTOL if kw["precision"] == "fp16" else 1e-4
    assert diff <= rtol * max(1.0, float(np.abs(want).max()))


ALL_CONFIGS = [
    ("int8-cpu", dict(precision="int8", flavour="cpu")),
    ("int8-cpu-rows", dict(precision="int8", flavour="cpu", int8_kernel="rows")),
    ("int8-portable", dict(precision="int8", flavour="portable")),
    ("int4-asym-cpu", dict(precision="int4", flavour="cpu", symmetric=False)),
    ("int4-sym-portable-g128", dict(precision="int4", flavour="portable", group_size=128)),
    ("int8-cpu-b64", dict(precision="int8", flavour="cpu", int8_block=64)),
    ("int8-cpu-mixed", dict(precision="int8", flavour="cpu", int8_kernel="mixed", int8_block=64)),
]


@pytest.mark.parametrize("label,kw", ALL_CONFIGS, ids=[c[0] for c in ALL_CONFIGS])
def test_quantized_bundle_structure_and_manifest(label, kw, tiny_ckpts, tmp_path, capfd):
    ckpts, calib = tiny_ckpts
    ckpt = ckpts["llama"]
    qcfg = QuantConfig(**kw, calib=CalibConfig(source=calib, samples=8, seqlen=64))
    bundle = Bundle.load(write_bundle(ckpt, tmp_path / "b", progress=False, quant=qcfg))
    m = bundle.manifest
    assert m["precision"] == kw["precision"]
    assert m["graph"]["flavour"] == kw["flavour"]
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    used = {n.domain or "" for n in model.graph.node}
    assert sorted(used) == m["graph"]["domains"]
    if kw["flavour"] == "portable":
        assert used == {""}, "portable graphs use standard ONNX ops only"
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for pair in bundle.graph["pools"]:
        for pool in pair:
            assert consumers[pool] == ["GatherND"]
    unread = [t.name for t in model.graph.initializer if t.name not in consumers]
    assert not unread, "constants a fusion left behind: ORT warns about each at every start"
    capfd.readouterr()
    ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    assert "Removing initializer" not in capfd.readouterr().err
    q = m["quantization"]
    layers = q["layers"]
    cfg = ckpt.config
    expected = {f"model.layers.{i}.{p}.weight" for i in range(cfg.num_layers)
                for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                          "mlp.down_proj")} | {"model.embed_tokens.weight", "lm_head.weight"}
    assert set(layers) == expected, "every weight's scheme is recorded, none skipped"
    for name, info in layers.items():
        if "embed" in name or "lm_head" in name:
            continue
        assert info["precision"] == kw["precision"]
        assert {"bits", "block_size", "symmetric", "scale_dtype", "k_padded"} <= set(info)
        if kw["precision"] == "int4":
            if kw["flavour"] == "portable":
                assert info["in"] % info["block_size"] == 0 and info["k_padded"] == info["in"]
            else:
                assert info["block_size"] == kw.get("group_size", 32)
        elif kw["flavour"] == "cpu":
            kernel = qcfg.int8_kernel_of(name)
            assert info["op"] == {"blocks": "MatMulNBits(bits=8)",
                                  "rows": "MatMulInteger"}[kernel], name
            if kernel == "blocks":
                assert info["block_size"] == kw.get("int8_block", 32)
            if kw.get("int8_kernel") == "mixed":
                assert kernel == ("rows" if "gate_up" in name else "blocks"), name
    if m["precision"] == "int8" and kw["flavour"] == "cpu":  # the table stays on Q8_0's grid
        assert layers["model.embed_tokens.weight"]["block_size"] == 32
    if kw["flavour"] == "portable" and kw.get("group_size") == 128:
        assert layers["model.layers.0.mlp.down_proj.weight"]["block_size"] == 112
        assert layers["model.layers.0.self_attn.o_proj.weight"]["block_size"] == 64
    if m["calibration"] is not None:
        assert "calibration.npz" in m["files"]
        assert m["calibration"]["samples"] == 8


def test_asymmetric_portable_is_refused():
    with pytest.raises(ValueError, match="zero point 0"):
        QuantConfig(precision="int4", flavour="portable", symmetric=False)
    with pytest.raises(ValueError, match="has none"):  # nothing it could apply to
        QuantConfig(precision="int8", symmetric=False)
    with pytest.raises(ValueError, match="float16 graph is portable"):
        QuantConfig(precision="fp16", lm_head="int4", symmetric=False)


MIXED_HEADS = [  # label, config, the gate it is held to (its coarsest weights')
    ("fp32-body-int4-head", dict(precision="fp32", lm_head="int4"), 0.15),
    ("fp32-body-int8-head", dict(precision="fp32", lm_head="int8"), 0.01),
    ("int8-body-int4-asym-head", dict(precision="int8", lm_head="int4", symmetric=False), 0.05),
    ("fp16-body-int8-head", dict(precision="fp16", lm_head="int8"), 0.03),
]


@pytest.mark.parametrize("label,kw,gate", MIXED_HEADS, ids=[c[0] for c in MIXED_HEADS])
def test_a_quantized_head_beside_another_body_is_calibrated_gated_and_exact(
        label, kw, gate, tiny_ckpts, tmp_path):
    """`--lm-head-precision` below the body's precision. These used to fail mid-export (a
    float body skipped calibration, so GPTQ had no Hessians for the head; a float16 body took
    the float32-only cpu kernels) or export with no quality gate at all (int8 with an
    asymmetric int4 head). Each is now gated by its coarsest weights and records its head; on
    a float32 body it computes its dequantized weights (exactly for int4: fp32 compute in
    MatMulNBits)."""
    ckpts, calib = tiny_ckpts
    ckpt = ckpts["qwen2"]  # an untied head: quantized on its own, not through the table
    qcfg = QuantConfig(**kw, embedding="fp32", accuracy_level=0,
                       calib=CalibConfig(source=calib, samples=8, seqlen=64))
    assert qcfg.gate == gate
    qg = build_quantized(ckpt, qcfg)
    assert qg.calibration is not None  # GPTQ's Hessians for the head
    bundle = Bundle.load(write_bundle(ckpt, tmp_path / "b", progress=False, quant=qcfg,
                                      calibration=qg.calibration))
    q = bundle.manifest["quantization"]
    assert q["gate"] == gate and q["lm_head"] == kw["lm_head"]
    assert q["layers"]["lm_head.weight"]["precision"] == kw["lm_head"]
    ids = [int(t) for t in RNG.integers(0, VOCAB, size=30)]
    got = _logits(bundle, ids)
    assert np.isfinite(got).all()
    if kw["precision"] != "fp32":
        return
    ref = Bundle.load(write_bundle(_dequantized_checkpoint(ckpt, qg.weights, False),
                                   tmp_path / "r", progress=False))
    want = _logits(ref, ids)
    # an int8 head quantizes its input per row and block of 32 inside MatMulNBits (accuracy
    # level 4 always, for batch invariance): within that rounding, not exact
    rtol = 1e-2 if kw["lm_head"] == "int8" else 1e-4
    assert float(np.abs(got - want).max()) <= rtol * max(1.0, float(np.abs(want).max()))


def test_a_float_body_with_a_float16_pool_is_gated_as_fp16():
    assert QuantConfig(precision="fp32", kv_dtype="float16").gate == 0.005
    assert QuantConfig(precision="fp32").gate is None  # lossless: nothing to gate
    assert QuantConfig(precision="int8", kv_dtype="float16").gate == 0.01


BATCHED = ALL_CONFIGS[:2] + ALL_CONFIGS[3:4] + ALL_CONFIGS[5:]


@pytest.mark.parametrize("label,kw", BATCHED, ids=[c[0] for c in BATCHED])
def test_batched_equals_sequential_on_quantized_bundles(label, kw, tiny_ckpts, tmp_path):
    """The batcher runs quantized bundles unchanged, and a sequence's tokens do not depend on
    what else is in its batch (activation scales are per row, never per tensor)."""
    ckpts, calib = tiny_ckpts
    qcfg = QuantConfig(**kw, calib=CalibConfig(source=calib, samples=8, seqlen=64))
    bundle = write_bundle(ckpts["qwen2"], tmp_path / "b", progress=False, quant=qcfg)
    prompts = [[int(t) for t in RNG.integers(3, VOCAB, size=n)] for n in (5, 17, 9, 30)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = LLM(str(bundle), kv_memory=8 << 20)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]  # first: its own blocks
    together = [c.token_ids for c in llm.generate(prompts, params)]
    assert together == alone


# ---- SmolLM2-135M: the quality gates ----------------------------------------------------------

EVAL = EvalConfig(window=512, stride=256, tokens=8192)


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf):
    return load_source(smollm2_gguf, progress=False)


@pytest.fixture(scope="session")
def fp32_reference(smollm2_bundle):
    """The fp32 bundle's scores, computed once per session and shared by every gate."""
    return CachedScorer(GraphScorer.from_bundle(smollm2_bundle)), bundle_tokens(smollm2_bundle)


class _Calib:
    """One calibration pass per session, only if a gate needs it."""

    value = None


def _smollm2_quantized(cache_dir: Path, ckpt: Checkpoint, key: str,
                       qcfg: QuantConfig) -> Bundle:
    from export.fingerprint import exporter_fingerprint

    out = cache_dir / "bundles" / f"smollm2-135m-{key}-{exporter_fingerprint()}"
    try:
        return Bundle.load(out)
    except Exception:
        pass
    calibration = None
    if qcfg.needs_calibration():
        if _Calib.value is None:
            _Calib.value = calibrate(ckpt, replace(qcfg.calib, hessians=True))
        calibration = _Calib.value
    t = time.perf_counter()
    write_bundle(ckpt, out, progress=False, name=f"smollm2-135m-{key}", overwrite=True,
                 quant=qcfg, calibration=calibration)
    print(f"exported {key} in {time.perf_counter() - t:.0f} s")
    return Bundle.load(out)


def _gate(bundle: Bundle, fp32_reference, smollm2_bundle, label: str):
    ref, tokens = fp32_reference
    t = time.perf_counter()
    res = evaluate_tokens(GraphScorer.from_bundle(bundle), tokens, EVAL, ref)
    res.bundle_bytes, res.reference_bundle_bytes = bundle_size(bundle), bundle_size(
        smollm2_bundle)
    print(format_summary(res, label))
    print(f"gate evaluation took {time.perf_counter() - t:.0f} s")
    assert res.scored_tokens >= 8192
    return res


GATES = {
    "int8-cpu": (dict(precision="int8", flavour="cpu"), 0.01),
    # round-to-nearest: the float-minimum grid reproduces the Q4_1 source exactly, so GPTQ
    # has no error to compensate (and the default run skips a calibration pass)
    "int4-asym-g32-cpu": (dict(precision="int4", flavour="cpu", symmetric=False,
                               method="rtn"), 0.05),
    "int8-portable": (dict(precision="int8", flavour="portable"), 0.03),
    "int4-sym-g32-portable": (dict(precision="int4", flavour="portable"), 0.15),
    # the AVX2 bundle (README): gate_up on MatMulInteger, blocks of 64 elsewhere
    "int8-cpu-mixed-b64": (dict(precision="int8", flavour="cpu", int8_kernel="mixed",
                                int8_block=64, kv_dtype="float16"), 0.01),
}


def test_gate_int8_cpu(cache_dir, smollm2_ckpt, smollm2_bundle, fp32_reference):
    kw, gate = GATES["int8-cpu"]
    b = _smollm2_quantized(cache_dir, smollm2_ckpt, "int8-cpu", QuantConfig(**kw))
    res = _gate(b, fp32_reference, smollm2_bundle, "int8 cpu")
    assert res.perplexity_rise <= gate
    assert res.top1_agreement >= 0.97
    assert res.bundle_bytes <= 0.30 * res.reference_bundle_bytes


def test_gate_int4_asymmetric_g32_cpu(cache_dir, smollm2_ckpt, smollm2_bundle, fp32_reference):
    kw, gate = GATES["int4-asym-g32-cpu"]
    b = _smollm2_quantized(cache_dir, smollm2_ckpt, "int4-asym-g32-cpu", QuantConfig(**kw))
    res = _gate(b, fp32_reference, smollm2_bundle, "int4 asymmetric g32 cpu")
    assert res.perplexity_rise <= gate
    assert res.bundle_bytes <= 0.20 * res.reference_bundle_bytes


@pytest.mark.parametrize("key", ["int8-cpu", "int4-asym-g32-cpu"])
def test_batched_equals_sequential_on_smollm2(key, cache_dir, smollm2_ckpt):
    """The real quantized bundles through the engine: greedy tokens of each prompt are the same
    alone and batched with others of different lengths."""
    kw, _ = GATES[key]
    _assert_batched_equals_alone(_smollm2_quantized(cache_dir, smollm2_ckpt, key,
                                                    QuantConfig(**kw)), key)


def _assert_batched_equals_alone(bundle: Bundle, key: str) -> None:
    llm = LLM(bundle, kv_memory=32 << 20)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ",
               "A list comprehension in Python creates"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]  # first: its own blocks
    together = [c.token_ids for c in llm.generate(prompts, params)]
    print(key, [llm.tokenizer.decode(t) for t in together])
    assert together == alone


@pytest.mark.slow
def test_gate_int8_cpu_mixed_kernels(cache_dir, smollm2_ckpt, smollm2_bundle, fp32_reference):
    """`--int8-kernel mixed`: per-row activation scales on gate_up cost some top-1 agreement
    (97.0% on Zen 3, against 97.4% for blocks everywhere), so its own bound is 96.5%; and the
    integer GEMM keeps a sequence's tokens independent of its batch."""
    kw, gate = GATES["int8-cpu-mixed-b64"]
    b = _smollm2_quantized(cache_dir, smollm2_ckpt, "int8-cpu-mixed-b64", QuantConfig(**kw))
    res = _gate(b, fp32_reference, smollm2_bundle, "int8 cpu mixed kernels")
    assert res.perplexity_rise <= gate
    assert res.top1_agreement >= 0.965
    _assert_batched_equals_alone(b, "int8-cpu-mixed-b64")


@pytest.mark.slow
def test_gate_int8_portable(cache_dir, smollm2_ckpt, smollm2_bundle, fp32_reference):
    kw, gate = GATES["int8-portable"]
    b = _smollm2_quantized(cache_dir, smollm2_ckpt, "int8-portable", QuantConfig(**kw))
    res = _gate(b, fp32_reference, smollm2_bundle, "int8 portable (W8A8)")
    assert res.perplexity_rise <= gate


@pytest.mark.slow
def test_gate_int4_symmetric_g32_portable(cache_dir, smollm2_ckpt, smollm2_bundle,
                                          fp32_reference):
    kw, gate = GATES["int4-sym-g32-portable"]
    b = _smollm2_quantized(cache_dir, smollm2_ckpt, "int4-sym-g32-portable",
                           QuantConfig(**kw))
    res = _gate(b, fp32_reference, smollm2_bundle, "int4 symmetric g32 portable (GPTQ)")
    assert res.perplexity_rise <= gate
    assert res.bundle_bytes <= 0.20 * res.reference_bundle_bytes


@pytest.mark.slow
def test_portable_and_cpu_flavours_agree_on_smollm2(cache_dir, smollm2_ckpt, fp32_reference):
    """What TensorRT will get (portable, run here on the CPU provider) against the cpu flavour:
    int4 symmetric g32 has the same blocks in both, so GPTQ gives both the same codes and only
    the kernels differ (MatMulNBits' int8 activations vs float16 DequantizeLinear outputs)."""
    kw = dict(precision="int4", symmetric=True)
    cpu = _smollm2_quantized(cache_dir, smollm2_ckpt, "int4-sym-g32-cpu",
                             QuantConfig(**kw, flavour="cpu"))
    portable = _smollm2_quantized(cache_dir, smollm2_ckpt, "int4-sym-g32-portable",
                                  QuantConfig(**kw, flavour="portable"))
    _, tokens = fp32_reference
    cfg = EvalConfig(window=512, stride=256, tokens=1024)
    res = evaluate_tokens(GraphScorer.from_bundle(cpu), tokens, cfg,
                          GraphScorer.from_bundle(portable))
    print(f"cpu vs portable int4: KL {res.mean_kl:.5f}, top-1 {res.top1_agreement:.4f}, "
          f"perplexity {res.perplexity:.3f} vs {res.reference_perplexity:.3f}")
    assert res.mean_kl <= FLAVOUR_KL and res.top1_agreement >= FLAVOUR_TOP1


# Between the flavours of one precision (stated in the README). Measured for int4 symmetric
# g32: KL 0.0044, top-1 96.5% (KL 0.0045, top-1 96.3% since the portable graph's activations are
# float16): the cpu flavour also quantizes activations to int8 inside MatMulNBits and stores the
# int8 table on Q8_0's blocks, the portable one per row.
FLAVOUR_KL = 0.01
FLAVOUR_TOP1 = 0.95


def test_flavours_agree_on_a_tiny_model(tiny_ckpts, tmp_path):
    """Same codes (group 16 divides both widths, so both flavours get the same blocks), two
    operator sets: logits agree to the float16 rounding of the portable graph's activations.
    Measured over 12 random id sequences (Zen 4): 0.36% to 0.89% of max |logit| (it read
    0.30% on one sequence, the bound was once 0.5% and held only for the sequence the module's
    shared generator happened to give); a wrong code, scale or block layout is tens of percent.
    The ids come from this test's own generator, so the answer does not depend on which tests
    ran before it."""
    ckpts, calib = tiny_ckpts
    ckpt = ckpts["qwen2"]
    common = dict(precision="int4", embedding="fp32", accuracy_level=0, group_size=16,
                  calib=CalibConfig(source=calib, samples=8, seqlen=64))
    cal = calibrate(ckpt, replace(common["calib"], hessians=True))
    out = {}
    for flavour in ("cpu", "portable"):
        qcfg = QuantConfig(**common, flavour=flavour)
        out[flavour] = Bundle.load(write_bundle(ckpt, tmp_path / flavour, progress=False,
                                                quant=qcfg, calibration=cal))
    ids = [int(t) for t in np.random.default_rng(4).integers(0, VOCAB, size=30)]
    a, b = _logits(out["cpu"], ids), _logits(out["portable"], ids)
    diff = float(np.abs(a - b).max())
    print(f"cpu vs portable: max |logit diff| {diff:.2e} "
          f"({diff / float(np.abs(a).max()):.2%} of max |logit|)")
    assert diff <= 1.5e-2 * float(np.abs(a).max())

def test_export_cli_prints_the_summary_and_applies_the_gate(tiny_ckpts, tmp_path):
    """`edgert export --precision int4`: the eval summary is printed; a bundle beyond its gate
    is refused (nothing written) unless --force. The tiny random model's int4 loss is far
    beyond any gate, so both branches are exercised."""
    import subprocess
    import sys

    _, calib = tiny_ckpts
    _, hf = make_tiny("llama", tmp_path / "hf")
    out = tmp_path / "b"
    base = [sys.executable, "-m", "edgert", "export", str(hf), "-o", str(out), "--no-progress",
            "--precision", "int4", "--group-size", "32", "--calib", calib, "--calib-samples",
            "4", "--calib-seqlen", "64", "--eval-tokens", "300"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert "perplexity" in proc.stdout and "top-1 agreement" in proc.stdout, proc.stderr
    if proc.returncode == 1:
        assert "REFUSED" in proc.stdout and not out.exists()
        assert not list(tmp_path.glob(".b.*")), "no half-written bundle left behind"
        proc = subprocess.run(base + ["--force"], capture_output=True, text=True, timeout=600)
        assert "kept because of --force" in proc.stdout
    assert proc.returncode == 0, proc.stderr
    m = Bundle.load(out).manifest
    assert m["precision"] == "int4" and m["quantization"]["method"] == "gptq"
    assert m["calibration"]["samples"] == 4


def test_in_place_kv_write_is_the_same_graph_faster(tiny_ckpts, tmp_path):
    """`--kv-write in-place` (the default over a float16 pool): TensorScatter (opset 24)
    instead of ScatterND, writing into the widened past, and every logit bit-identical to the
    ScatterND graph's, through prefill and decode on the paged pool."""
    import onnx

    ckpts, calib = tiny_ckpts
    ids = [int(t) for t in np.random.default_rng(6).integers(0, VOCAB, size=30)]
    out = {}
    for mode in ("scatter", "auto"):
        qcfg = QuantConfig(precision="int8", kv_write=mode, kv_dtype="float16",
                           calib=CalibConfig(source=calib, samples=8, seqlen=64))
        bundle = Bundle.load(write_bundle(ckpts["qwen2"], tmp_path / mode, progress=False,
                                          quant=qcfg))
        graph = onnx.load(str(bundle.model_path)).graph
        ops = {n.op_type for n in graph.node}
        assert ("TensorScatter" in ops) == (mode == "auto") != ("ScatterND" in ops)
        assert bundle.graph["opset"] == 24  # the cpu flavour: fused RoPE, TensorScatter
        if mode == "auto":  # it writes into the Cast's fresh float32 buffer, never the gather's
            made = {o: n.op_type for n in graph.node for o in n.output}
            assert {made[n.input[0]] for n in graph.node if n.op_type == "TensorScatter"} == {
                "Cast"}
        out[mode] = _logits(bundle, ids)
    np.testing.assert_array_equal(out["auto"], out["scatter"])
    # where it does not apply, auto is ScatterND and asking for it is refused
    assert not QuantConfig(precision="int8").in_place_kv  # a float32 pool
    assert not QuantConfig(precision="int8", flavour="portable", kv_dtype="float16").in_place_kv
    assert not QuantConfig(precision="fp32", kv_dtype="float16").in_place_kv
    with pytest.raises(ValueError, match="cpu flavours"):
        QuantConfig(precision="int8", flavour="portable", kv_write="in-place")
    with pytest.raises(ValueError, match="needs --kv-dtype float16"):
        QuantConfig(precision="int8", kv_write="in-place")


@pytest.mark.parametrize("flavour", ["cpu", "portable"])
def test_smoothing_folds_into_the_weights_before_it(flavour, tiny_ckpts, tmp_path,
                                                    monkeypatch):
    """SmoothQuant's 1/s is folded into the weights before each projection: the RMSNorm's
    weight before qkv and gate_up (graph.py's fold_scale_chains), up's rows before down
    (quantize.py), in float32 graphs; a float16 (portable) graph keeps every Mul, and the cpu
    flavour does not smooth o_proj. The same function: up's codes unchanged and its
    scales divided by s, and the logits as close to the float model's as unfolded (they
    differ from the unfolded graph's only where an int8 activation rounds the other way)."""
    from export.graph import DecoderGraphBuilder

    ckpts, calib = tiny_ckpts
    ckpt = ckpts["llama"]
    ids = [int(t) for t in np.random.default_rng(8).integers(0, VOCAB, size=30)]
    qcfg = QuantConfig(precision="int8", flavour=flavour,
                       calib=CalibConfig(source=calib, samples=8, seqlen=64))
    out, weights, layers = {}, {}, ckpt.config.num_layers
    for fold in (False, True):
        monkeypatch.setattr(DecoderGraphBuilder, "fold_scales", fold)
        qg = build_quantized(ckpt, qcfg)
        weights[fold] = qg.weights
        graph = qg.model.graph
        inits = {t.name for t in graph.initializer}
        made = {o: n for n in graph.node for o in n.output}
        smooth_muls = [n for n in graph.node if n.op_type == "Mul"
                       and any(i.endswith(".smooth_inv") for i in n.input)]
        kinds = sorted(next(i for i in n.input if i in inits).split(".")[-3]
                       for n in smooth_muls)
        want = ["down_proj", "gate_up_proj", "qkv_proj"]
        if flavour == "cpu":  # float32 activations fold them; cpu smooths no o_proj
            want = [] if fold else want
        else:  # float16 activations keep every Mul (graph.py: DecoderGraphBuilder.fold_scales)
            want += ["o_proj"]
        assert kinds == sorted(want * layers)

        by_const = {n.output[0] for n in graph.node  # Muls of a tensor by a constant
                    if n.op_type == "Mul" and len(set(n.input) & inits) == 1}
        chains = [o for o in by_const if any(i in by_const for i in made[o].input)]
        assert bool(chains) != (fold and flavour == "cpu")  # a norm's weight, then 1/s
        if not fold:
            inv_s = {t.name: t for t in graph.initializer}
        bundle = Bundle.load(write_bundle(ckpt, tmp_path / f"{fold}", progress=False,
                                          quant=qcfg))
        out[fold] = _logits(bundle, ids)
    for layer in range(layers if flavour == "cpu" else 0):  # gate's rows unchanged; up's the
        # same weights divided by s
        p = f"model.layers.{layer}.mlp."
        a, b = weights[False][p + "gate_up_proj.weight"], weights[True][p + "gate_up_proj.weight"]
        inter = a.n // 2
        np.testing.assert_array_equal(a.codes[:inter], b.codes[:inter])
        np.testing.assert_array_equal(a.scale[:inter], b.scale[:inter])
        inv = numpy_helper.to_array(inv_s[p + "down_proj.weight.smooth_inv"])
        want = a.dequantize()[inter:] * inv[:, None]
        step = np.abs(want).max(axis=1, keepdims=True) / 127  # one int8 code of each row
        assert (np.abs(b.dequantize()[inter:] - want) <= 4 * step).all()
    ref = _logits(Bundle.load(write_bundle(ckpt, tmp_path / "fp32", progress=False)), ids)
    err = {fold: float(np.abs(out[fold] - ref).max()) for fold in out}
    print(f"{flavour}: max |logit error| vs fp32 unfolded {err[False]:.3f} folded "
          f"{err[True]:.3f}; between them {np.abs(out[True] - out[False]).max():.3f}")
    assert err[True] <= 1.5 * err[False]
