"""Float16 graphs (`--precision fp16`, and the portable int8/int4 flavours): what a strongly typed
TensorRT network builds as written. Float16 activations, weights, KV pools and new_kv; RMSNorm,
the masked scores and their Softmax, and the RoPE tables in float32; float32 logits. Checked on
ONNX Runtime's CPU provider against the float32 graph of the same checkpoint (tiny random models
and SmolLM2-135M), through the engine, and structurally: types, Q/DQ layout, positive scales."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from edgert.bundle import FORMAT_VERSION, Bundle
from edgert.engine import LLM, EngineConfig
from edgert.sampling_params import SamplingParams
from export.bundle_writer import write_bundle
from export.calibration import CalibConfig
from export.graph import MASK_VALUE, build_decoder
from export.pipeline import load_source
from export.quant_formats import SCALE_FLOOR
from export.quantize import QuantConfig, build_quantized
from tests.paged_runner import PagedRunner
from tests.tiny_models import VOCAB, make_tiny, reference_logits

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
ARCHS = ["llama", "llama-mha", "qwen2", "qwen3"]
FP16 = QuantConfig(precision="fp16")

# fp16 vs fp32 logits of one checkpoint, as a fraction of the largest |logit| of the fp32 graph.
# float16 keeps 11 significant bits (unit roundoff u = 2^-11 = 4.9e-4) and every op's output is
# rounded: the residual stream, the projections, q/k/v, the pool. ORT's CPU provider has few
# float16 kernels on x86: it inserts Casts and runs chains of ops in float32 (only the weights,
# the pool, new_kv and some edges are really rounded), so what it measures is a lower bound of a
# GPU's rounding of every op; transformers' float16 forward (torch rounds every op's output) is
# the upper reference. Tiny random models (weights of std 0.3, attention far from uniform, 2
# layers): 0.2-1.2% here, transformers 0.4-1.3%: the tolerance is 2% (40 u). SmolLM2-135M (30
# layers of a trained model): 0.09-0.15% here, transformers 0.24-0.32%: its tolerance is 0.5%.
FP16_LOGIT_RTOL = 2e-2
SMOLLM2_FP16_RTOL = 5e-3


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX's strict type inference (which also proves the
    graph type-consistent: a strongly typed network takes no implicit casts)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _run_logits(bundle: Bundle, ids: list[int], prefill: int, block_size: int = 4
                ) -> np.ndarray:
    """A prefill of `prefill` tokens, then one decode step per remaining token."""
    runner = PagedRunner(bundle, block_size=block_size, num_blocks=40, seed=7)
    got = [runner.run([(0, ids[:prefill])])[0]]
    got += [runner.run([(0, [t])])[0] for t in ids[prefill:]]
    return np.concatenate(got)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"fp16-{arch}")
    model, hf = make_tiny(arch, root / "hf", tie=(arch == "qwen3"))
    ckpt = load_source(hf)
    b32 = Bundle.load(write_bundle(ckpt, root / "fp32", progress=False))
    b16 = Bundle.load(write_bundle(ckpt, root / "fp16", progress=False, quant=FP16))
    return arch, model, ckpt, b32, b16


# ---- the fp16 graph -------------------------------------------------------------------------

def test_fp16_graph_types_and_calling_convention(tiny):
    """float16 pools, new_kv and activations; float32 RMSNorm statistics, masked scores, Softmax
    and RoPE tables; float32 logits; int32 index inputs; each pool read only by its GatherND;
    finite float16 constants; IR 10; the manifest says float16 KV, bundle format unchanged."""
    arch, _, _, _, b16 = tiny
    m = b16.manifest
    assert m["format_version"] == FORMAT_VERSION == 2
    assert m["precision"] == "fp16" and m["kv"]["dtype"] == "float16"
    assert m["graph"]["activation_dtype"] == "float16"
    model = onnx.load(str(b16.model_path))
    assert model.ir_version == 10
    types = _types(model)
    io = b16.graph
    for name in io["inputs"].values():
        assert types[name] == TensorProto.INT32, name
    pools = [n for pair in io["pools"] for n in pair]
    cons = _consumers(model)
    for pool in pools:
        assert types[pool] == F16, pool
        assert [n.op_type for n in cons[pool]] == ["GatherND"], pool
    assert types[io["outputs"]["logits"]] == F32
    assert types[io["outputs"]["new_kv"]] == F16
    seen: dict[str, int] = {}
    for node in model.graph.node:
        seen[node.op_type] = seen.get(node.op_type, 0) + 1
        ins = [types[i] for i in node.input if i]
        if node.op_type in ("MatMul", "Gemm"):  # every GEMM, the LM head included
            assert ins[:2] == [F16, F16], (node.name, ins)
        elif node.op_type in ("Softmax", "ReduceMean", "Sqrt", "Reciprocal", "Cos", "Sin"):
            assert ins[0] == F32, (node.name, node.op_type, ins)
        elif node.op_type == "Where":  # the masked scores
            assert ins[1:] == [F32, F32], (node.name, ins)
        elif node.op_type in ("GatherND", "ScatterND"):
            assert ins[0] == F16, (node.name, ins)
    cfg = b16.config
    assert seen["Softmax"] == cfg.num_layers
    norms = 2 * cfg.num_layers + 1 + (2 * cfg.num_layers if cfg.qk_norm else 0)
    assert seen["ReduceMean"] == norms  # every RMSNorm's mean of squares, in float32
    mask = [t for t in model.graph.initializer if t.name == "mask_value"][0]
    assert mask.data_type == F32 and numpy_helper.to_array(mask) == np.float32(MASK_VALUE)
    for t in model.graph.initializer:
        if t.data_type == F16:
            assert np.isfinite(numpy_helper.to_array(t)).all(), t.name
    print(f"{arch}: {seen.get('Cast', 0)} Casts")


def test_fp16_logits_match_fp32(tiny):
    """Prefills of 1, 6 and 17 tokens, then 20 decode steps each through the pool (block size 4,
    shuffled blocks of garbage): fp16 logits within FP16_LOGIT_RTOL of the fp32 graph's."""
    arch, model, _, b32, b16 = tiny
    rng = np.random.default_rng(11)
    worst = 0.0
    for prefill in (1, 6, 17):
        ids = [int(t) for t in rng.integers(0, VOCAB, size=prefill + 20)]
        want, got = _run_logits(b32, ids, prefill), _run_logits(b16, ids, prefill)
        assert got.dtype == np.float32 and np.isfinite(got).all()
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, rel)
        assert rel <= FP16_LOGIT_RTOL, f"{arch}: prefill {prefill}: {rel:.2%} of max |logit|"
    # For scale: transformers' own float16 forward of the same checkpoint on the last sequence.
    ref = reference_logits(model, ids)
    with torch.no_grad():
        hf16 = copy.deepcopy(model).to(torch.float16)(torch.tensor([ids])).logits[0]
    hf_rel = float(np.abs(hf16.float().numpy() - ref).max() / np.abs(ref).max())
    print(f"{arch}: fp16 vs fp32 graph max |diff| {worst:.3%} of max |logit| "
          f"(transformers fp16 vs fp32: {hf_rel:.3%})")


def test_fp16_batched_equals_alone_in_the_engine(tiny):
    """The engine runs the fp16 bundle end to end on a float16 pool; greedy tokens equal the
    reference runner's (one sequence at a time, block size 4) and are the same batched."""
    arch, _, _, _, b16 = tiny
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in (3, 11, 26)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm = LLM(b16, EngineConfig(kv_memory=4 << 20, verify_bundle=False))
    assert llm.engine.runner.backend.pool.dtype == np.float16
    together = [c.token_ids for c in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    runner = PagedRunner(b16, block_size=4, num_blocks=64, seed=1)
    reference = [runner.greedy(p, 16)[0] for p in prompts]
    assert alone == reference, arch
    assert together == reference, arch


def test_fp16_constants_never_overflow(tiny):
    """A weight beyond float16's range is refused when the graph is built, never stored as
    inf."""
    _, _, ckpt, _, _ = tiny
    w = dict(ckpt.weights)
    name = "model.layers.0.mlp.down_proj.weight"
    w[name] = w[name].copy()
    w[name][0, 0] = 7.0e4
    with pytest.raises(ValueError, match="overflows float16"):
        build_decoder(replace(ckpt, weights=w), dtype="float16")


# ---- SmolLM2 ----------------------------------------------------------------------------------

SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
                "A list comprehension in Python creates", "Once upon a time, in a small village,"]


def test_smollm2_fp16_against_fp32(smollm2_gguf, smollm2_bundle, tmp_path):
    """The real model: greedy continuations of the fp16 bundle equal the fp32 bundle's, except
    after a teacher-forced near-tie (fp32's top-2 margin within twice the logit tolerance at the
    first difference); along fp32's continuation (teacher-forced) the fp16 logits stay within
    SMOLLM2_FP16_RTOL of fp32's. The engine, all prompts batched on its float16 pool, gives the
    reference runner's fp16 tokens exactly."""
    from edgert.text.tokenizer import Tokenizer

    b16 = Bundle.load(write_bundle(load_source(smollm2_gguf, progress=False), tmp_path / "fp16",
                                   progress=False, quant=FP16))
    assert b16.kv["dtype"] == "float16"
    tok = Tokenizer.from_bundle(smollm2_bundle)
    n_new, worst, equal, runner16 = 24, 0.0, 0, []
    r32 = PagedRunner(smollm2_bundle, block_size=16, num_blocks=32)
    r16 = PagedRunner(b16, block_size=16, num_blocks=32)
    for prompt in SMOL_PROMPTS:
        ids = tok.encode(prompt)
        toks32, steps32 = r32.greedy(ids, n_new)
        want = np.stack(steps32)
        toks16, _ = r16.greedy(ids, n_new)
        runner16.append(toks16)
        got = _forced(r16, ids, toks32)
        tol = SMOLLM2_FP16_RTOL * float(np.abs(want).max())
        diff = float(np.abs(got - want).max())
        worst = max(worst, diff / float(np.abs(want).max()))
        assert diff <= tol, f"{prompt!r}: max |logit diff| {diff:.3f} > {tol:.3f}"
        if toks16 == toks32:
            equal += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(toks16, toks32)) if a != b)
        top2 = np.sort(want[first])[-2:]
        margin = float(top2[1] - top2[0])
        print(f"{prompt!r}: differs at token {first}, fp32 margin {margin:.4f}")
        assert margin <= 2 * tol, f"{prompt!r}: token {first} differs at margin {margin:.3f}"
    print(f"SmolLM2 fp16 vs fp32: max |logit diff| {worst:.3%} of max |logit|; greedy "
          f"{equal}/{len(SMOL_PROMPTS)} continuations of {n_new} tokens identical")
    llm = LLM(b16, EngineConfig(kv_memory=16 << 20, verify_bundle=False))
    assert llm.engine.runner.backend.pool.dtype == np.float16
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    assert [c.token_ids for c in llm.generate(SMOL_PROMPTS, params)] == runner16


def _forced(runner: PagedRunner, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The logits each of `tokens` is chosen from, feeding `tokens` (teacher forcing)."""
    rows = [runner.run([(0, list(prompt))])[0][-1]]
    rows += [runner.run([(0, [t])])[0][-1] for t in tokens[:-1]]
    runner.release(0)
    return np.stack(rows)


# ---- the portable int8 / int4 flavours ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16q")
    out = {}
    for arch, tie in (("llama", True), ("qwen2", False)):
        _, path = make_tiny(arch, root / arch, tie=tie)
        out[arch] = load_source(path)
    calib = root / "calib.txt"
    rng = np.random.default_rng(3)
    calib.write_text(" ".join(f"w{i}" for i in rng.integers(0, VOCAB, size=4000)))
    return out, str(calib)


PORTABLE = [
    ("int8", dict(precision="int8")),
    ("int4-g32", dict(precision="int4")),
    ("int4-g128", dict(precision="int4", group_size=128)),
]


def _check_portable(model: onnx.ModelProto, layers: dict) -> dict[str, int]:
    """Every DequantizeLinear scale float16 and > 0; int4 DQ inputs 2-D INT4 initializers, no
    zero point, block sizes that divide K (as recorded); Q/DQ of activations per tensor, per
    channel only on constant weights. Returns counts by kind."""
    types = _types(model)
    inits = {t.name: t for t in model.graph.initializer}
    counts = {"dq": 0, "int4": 0, "q": 0}
    for node in model.graph.node:
        if node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            if node.op_type in ("MatMul", "Gemm"):
                ins = [types[i] for i in node.input[:2]]
                # float16 GEMMs; an LM head asked for in fp32 computes in float32
                assert ins == [F16, F16] or (node.output[0] == "logits" and ins == [F32, F32])
            continue
        scale = inits[node.input[1]]
        s = numpy_helper.to_array(scale)
        assert scale.data_type == F16, f"{node.name}: scale {scale.data_type}"
        assert np.isfinite(s).all() and (s > 0).all(), f"{node.name}: scale min {s.min()}"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QuantizeLinear":
            counts["q"] += 1
            assert s.ndim == 0, "activations are quantized per tensor only"
            assert types[node.input[0]] == F16
            continue
        counts["dq"] += 1
        assert types[node.output[0]] == F16  # a DQ outputs its scale's type
        q = node.input[0]
        if q not in inits:  # an activation's DQ, right after its Q
            assert s.ndim == 0
            continue
        w = inits[q]
        if w.data_type == TensorProto.INT4:
            counts["int4"] += 1
            assert len(w.dims) == 2 and len(node.input) == 2, "2-D INT4, no zero point"
            block = attrs["block_size"]
            k, n = w.dims
            assert attrs.get("axis") == 0 and k % block == 0
            assert list(scale.dims) == [k // block, n]
            name = q[: -len(".qweight")]
            assert layers[name]["block_size"] == block and layers[name]["in"] == k
        else:
            assert w.data_type == TensorProto.INT8 and s.ndim == 1  # per output channel
    return counts


@pytest.mark.parametrize("label,kw", PORTABLE, ids=[c[0] for c in PORTABLE])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_portable_graphs_are_float16(arch, label, kw, tiny_ckpts, tmp_path):
    ckpts, calib = tiny_ckpts
    qcfg = QuantConfig(**kw, flavour="portable",
                       calib=CalibConfig(source=calib, samples=8, seqlen=64))
    bundle = Bundle.load(write_bundle(ckpts[arch], tmp_path / "b", progress=False, quant=qcfg))
    m = bundle.manifest
    assert m["kv"]["dtype"] == "float16" and m["graph"]["activation_dtype"] == "float16"
    assert m["graph"]["ort_session_config"] == {"session.disable_quant_qdq": "1"}
    model = onnx.load(str(bundle.model_path))
    assert model.ir_version == 10
    counts = _check_portable(model, m["quantization"]["layers"])
    cfg = ckpts[arch].config
    if kw["precision"] == "int4":
        assert counts["int4"] == 4 * cfg.num_layers and counts["q"] == 0
    else:  # W8A8 where the activations allow; the down projection and the LM head W8A16
        assert counts["q"] == 3 * cfg.num_layers
    logits = _run_logits(bundle, [int(t) for t in np.arange(3, 33)], 20)
    assert np.isfinite(logits).all()


def test_portable_refuses_float32_scales():
    with pytest.raises(ValueError, match="scales are float16"):
        QuantConfig(precision="int4", flavour="portable", scale_dtype="float32")
    QuantConfig(precision="int4", flavour="cpu", scale_dtype="float32")  # cpu may


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_all_zero_and_tiny_blocks_get_positive_scales(precision, tiny_ckpts, tmp_path):
    """An output channel of zeros (every block of it all-zero: GPTQ's error feedback stays
    inside a row, so it stays zero) and one of weights ~1e-9 (whose scale rounds to 0 in float16:
    codes would divide by zero) get the smallest normal float16 as scale, the manifest counts
    them, the dequantized rows are ~0, and the bundle runs to the fp16 graph of its own
    dequantized weights."""
    ckpts, calib = tiny_ckpts
    ckpt = ckpts["qwen2"]
    name = "model.layers.1.self_attn.o_proj.weight"
    w = dict(ckpt.weights)
    w[name] = w[name].copy()
    w[name][3] = 0.0
    w[name][5] = 1e-9 * np.random.default_rng(0).normal(size=w[name].shape[1])
    ckpt = replace(ckpt, weights=w)
    qcfg = QuantConfig(precision=precision, flavour="portable", embedding="fp32",
                       calib=CalibConfig(source=calib, samples=8, seqlen=64))
    qg = build_quantized(ckpt, qcfg)
    bundle = Bundle.load(write_bundle(ckpt, tmp_path / "b", progress=False, quant=qcfg,
                                      calibration=qg.calibration))
    model = onnx.load(str(bundle.model_path))
    _check_portable(model, bundle.manifest["quantization"]["layers"])
    qw = qg.weights[name]
    floor = SCALE_FLOOR["float16"]
    assert (qw.scale[[3, 5]] == floor).all()
    assert bundle.manifest["quantization"]["layers"][name]["scales_clamped"] == qw.scale[
        [3, 5]].size
    assert np.abs(qw.dequantize()[[3, 5]]).max() <= floor
    ids = [int(t) for t in np.arange(3, 33)]
    got = _run_logits(bundle, ids, 20)
    assert np.isfinite(got).all()
    if precision == "int4":  # weight-only: exactly the fp16 graph of the dequantized weights
        from tests.test_quantization import _dequantized_checkpoint

        deq = _dequantized_checkpoint(ckpt, qg.weights, fp16_dq=True)
        ref = Bundle.load(write_bundle(deq, tmp_path / "r", progress=False,
                                       quant=QuantConfig(precision="fp16", embedding="fp32")))
        want = _run_logits(ref, ids, 20)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_gate_fp16_smollm2(smollm2_gguf, smollm2_bundle, tmp_path):
    """The fp16 bundle against its quality gate (export/gates.py): perplexity over >= 8k
    held-out tokens relative to the fp32 bundle."""
    from edgert.tools.evaluate import (
        EvalConfig,
        GraphScorer,
        bundle_tokens,
        evaluate_tokens,
        format_summary,
    )
    from export.gates import quality_gate

    b16 = Bundle.load(write_bundle(load_source(smollm2_gguf, progress=False), tmp_path / "fp16",
                                   progress=False, quant=FP16))
    res = evaluate_tokens(GraphScorer.from_bundle(b16), bundle_tokens(smollm2_bundle),
                          EvalConfig(window=512, stride=256, tokens=8192),
                          GraphScorer.from_bundle(smollm2_bundle))
    print(format_summary(res, "fp16"))
    assert res.scored_tokens >= 8192
    assert res.perplexity_rise <= quality_gate("fp16", "portable", True)
