"""A served answer never depends on who else is served: every logprob of every generated token,
bit for bit, is the same alone, batched with others, prefilled in chunks, preempted and
recomputed, or after a prefix-cache hit; for fp32, int8 and int4 bundles, on whatever x86 CPU
runs the suite (the CPU flags are printed and named in every failure).

The graph relies on a few ONNX Runtime CPU kernels giving a row the same bits whatever rows
surround it; the first tests pin exactly those, so a new ORT release or CPU that breaks one
fails here, by name, before any model-level test does."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgert.core.shapes import pow2
from edgert.engine import EngineConfig, LLMEngine
from edgert.sampling_params import SamplingParams

RNG = np.random.default_rng(11)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown CPU"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


CPU = cpu_flags()


def _session(nodes, inputs, inits=(), contrib=False) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "op", inputs, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None)], initializer=list(inits))
    opsets = [helper.make_opsetid("", 21)]
    if contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _vi(name: str) -> helper.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


# ---- the kernels the graph relies on ----------------------------------------------------------

def test_softmax_row_is_exact_whatever_the_padding_and_neighbours():
    """The attention softmax over [past keys | padding]: a row's probabilities do not depend on
    how far the batch pads it (multiples of the 16-token block) nor on the rows around it."""
    sess = _session([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [_vi("x")])
    for valid in (1, 5, 17, 40, 130):
        row = (RNG.normal(size=valid) * 4).astype(np.float32)
        outs = []
        for width in sorted({16 * -(-valid // 16), 64 * -(-valid // 64), 256}):
            for rows, at in ((1, 0), (9, 4), (27, 26)):
                x = RNG.normal(size=(rows, width)).astype(np.float32)
                x[at] = -1e30
                x[at, :valid] = row
                outs.append(sess.run(None, {"x": x})[0][at, :valid])
        for o in outs[1:]:
            assert np.array_equal(o, outs[0]), f"Softmax row differs ({CPU})"


def test_attention_matmuls_are_exact_from_two_rows_on():
    """[S, kvh, rows, K] @ [S, kvh, K, N]: a row's result does not depend on the other rows (from
    two rows on: a one-row GEMM takes ORT's GEMV path, which sums in another order: the graph
    therefore stacks the query heads of a KV head into the rows), nor on zero padding of K."""
    sess = _session([helper.make_node("MatMul", ["a", "b"], ["y"])], [_vi("a"), _vi("b")])
    for k, n in ((16, 64), (64, 48), (256, 64)):
        a0 = RNG.random((1, 3, 3, k)).astype(np.float32)
        b0 = RNG.normal(size=(1, 3, k, n)).astype(np.float32)
        ref = sess.run(None, {"a": a0, "b": b0})[0]
        for s, rows, pad in ((4, 3, 0), (2, 24, 16), (16, 6, 48)):
            a = RNG.random((s, 3, rows, k + pad)).astype(np.float32)
            b = RNG.normal(size=(s, 3, k + pad, n)).astype(np.float32)
            a[-1, :, :3, :k], a[-1, :, :3, k:] = a0[0], 0.0
            b[-1, :, :k] = b0[0]
            got = sess.run(None, {"a": a, "b": b})[0][-1:, :, :3]
            assert np.array_equal(got, ref), f"MatMul k={k} n={n} s={s} ({CPU})"


HIDDEN = 576  # SmolLM2-135M's: the K of its attention and up projections


def _matmulnbits(bits: int, k: int = HIDDEN, n: int = 960,
                 block: int = 32) -> ort.InferenceSession:
    codes = RNG.integers(0, 2 ** bits, size=(n, k // block, block)).astype(np.uint8)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(
        RNG.uniform(1e-3, 2e-2, size=n * (k // block)).astype(np.float32), "scales")]
    return _session([helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"],
                                      domain="com.microsoft", K=k, N=n, bits=bits,
                                      block_size=block, accuracy_level=4)],
                    [_vi("x")], inits, contrib=True)


def one_row_differs(bits: int) -> bool:
    """Whether a one-row MatMulNBits call gives a row other bits than a two-row one on this
    CPU (ORT 1.32: the 4-bit kernel on AVX2 without VNNI does, by ~1e-6; nothing on Zen 4)."""
    sess = _matmulnbits(bits)
    x = RNG.normal(size=(2, HIDDEN)).astype(np.float32)
    return not np.array_equal(sess.run(None, {"x": x[:1]})[0][0], sess.run(None, {"x": x})[0][0])


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_int8_compute_rows_are_exact_from_two_rows_on(bits):
    """MatMulNBits at accuracy level 4 (activations quantized to int8 per row and block) gives
    a row the same bits with 2 or 256 rows around it. Levels 0/1 (fp32 compute) do not, which
    is why the cpu bundles keep level 4. A one-row call may take another path (see
    test_engine_pads_a_lone_decoding_row_where_one_row_differs)."""
    sess = _matmulnbits(bits)
    pair = RNG.normal(size=(2, HIDDEN)).astype(np.float32)
    ref = sess.run(None, {"x": pair})[0]
    for m in (3, 7, 16, 64, 256):
        x = RNG.normal(size=(m, HIDDEN)).astype(np.float32)
        x[m // 2] = pair[0]
        got = sess.run(None, {"x": x})[0][m // 2]
        assert np.array_equal(got, ref[0]), f"MatMulNBits bits={bits} m={m} ({CPU})"


# ---- the engine on the real model ---------------------------------------------------------------

def _prompts(tok) -> list[list[int]]:
    system = tok.encode("You are a careful assistant for a factory floor robot. Answer briefly "
                        "and precisely, and say when you do not know. " * 2)
    questions = ["What is 2+2?", "Name a colour.", "Where is Paris?", "How many legs?"]
    texts = ["def fibonacci(n):\n    ", "Once upon a time", "The capital of Japan is",
             "List three animals:"]
    return ([system + tok.encode(" Q: " + q, add_special_tokens=False) for q in questions]
            + [tok.encode(t) for t in texts])


PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)


def _run(engine: LLMEngine, prompts: list[list[int]], stagger: int) -> dict[int, list]:
    """Requests arrive one every `stagger` steps; returns (token, logprob, top-5) per step."""
    got: dict[int, list] = {}
    rid_of: dict[str, int] = {}
    pending, step = list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        if pending and step % stagger == 0:
            i, p = pending.pop(0)
            rid_of[engine.add_request(p, PARAMS)] = i
        for out in engine.step():
            got.setdefault(rid_of[out.request_id], []).extend(
                (lp.token_id, lp.logprob, tuple(sorted(lp.top.items()))) for lp in out.logprobs)
        step += 1
    assert engine.pool_usage().used == 0
    return got


def _engine(bundle, **kw) -> LLMEngine:
    cfg = dict(kv_memory=32 << 20, verify_bundle=False, max_num_batched_tokens=128)
    cfg.update(kw)
    return LLMEngine(bundle, EngineConfig(**cfg))


def _check_invariance(bundle, label: str, prompts: list[list[int]] | None = None) -> None:
    """`prompts` (token ids): the first two should share a prefix; default SmolLM2's."""
    single = _engine(bundle, enable_prefix_caching=False, max_num_seqs=1)
    prompts = prompts or _prompts(single.tokenizer)
    alone = {}
    for i, p in enumerate(prompts):
        alone[i] = _run(single, [p], 1)[0]
    # A pool of 7 blocks of at most 16 tokens: the default bundles' blocks of 32 then run
    # smaller here than alone, so the answers are checked across block sizes too
    small = min(single.block_size, 16)
    per_small = single.block_bytes * small // single.block_size
    variants = {
        "batched, prefix cache on": (dict(), 2),
        "chunked prefill (16-token budget)": (dict(max_num_batched_tokens=16), 1),
        "small pool: waits and preemptions": (
            dict(kv_memory=7 * per_small, block_size=small, enable_prefix_caching=False), 1),
        "three at a time": (dict(max_num_seqs=3), 1),
    }
    for name, (kw, stagger) in variants.items():
        engine = _engine(bundle, **kw)
        got = _run(engine, prompts, stagger)
        for i in range(len(prompts)):
            assert got[i] == alone[i], (
                f"{label}, {name}: prompt {i} differs from its run alone on this CPU ({CPU})")
        if "preemptions" in name:
            assert engine.stats.preemptions > 0, "the small pool should have preempted"
        if "prefix" in name:
            assert engine.stats.cached_prompt_tokens > 0, "the system prompt should hit"
    print(f"{label}: bit-identical in {len(variants)} batch configurations ({CPU})")


def test_fp32_bundle_is_bit_exact_under_any_batch(smollm2_bundle):
    _check_invariance(smollm2_bundle, "fp32")


@pytest.mark.parametrize("key", ["int8-cpu", "int4-asym-g32-cpu"])
def test_quantized_bundles_are_bit_exact_under_any_batch(key, cache_dir, smollm2_gguf):
    from export.pipeline import load_source
    from export.quantize import QuantConfig
    from tests.test_quantization import GATES, _smollm2_quantized

    kw, _ = GATES[key]
    bundle = _smollm2_quantized(cache_dir, load_source(smollm2_gguf, progress=False), key,
                                QuantConfig(**kw))
    _check_invariance(bundle, key)


@pytest.mark.parametrize("key,bits", [("int8-cpu", 8), ("int4-asym-g32-cpu", 4)])
def test_engine_pads_a_lone_decoding_row_where_one_row_differs(key, bits, cache_dir, smollm2_gguf):
    """The engine's start-up probe (the same row decoded alone and beside another) agrees with
    the kernel: where the bundle's one-row MatMulNBits path sums in another order on this CPU,
    a lone stream decodes with a padding token (T = 2) and no call ever has one row of one
    token; elsewhere nothing changes."""
    from export.pipeline import load_source
    from export.quantize import QuantConfig
    from tests.test_quantization import GATES, _smollm2_quantized

    kw, _ = GATES[key]
    bundle = _smollm2_quantized(cache_dir, load_source(smollm2_gguf, progress=False), key,
                                QuantConfig(**kw))
    engine = _engine(bundle, max_num_seqs=1)
    pad = one_row_differs(bits)
    assert engine.menu.pad_lone_decode == pad, f"{key} ({CPU})"
    prompt = _prompts(engine.tokenizer)[4]
    _run(engine, [prompt], 1)
    assert engine.stats.decode_calls == PARAMS.max_tokens - 1
    prefill = (1, pow2(len(prompt)))
    decodes = {(s, t) for s, t, _ in engine.runner.seen} - {prefill}
    assert decodes == {(1, 1 + pad)}, f"{key}: {engine.runner.seen} ({CPU})"
    assert engine.runner.seen <= set(engine.menu.all())
    print(f"{key}: a lone decoding row takes {1 + pad} token(s) ({CPU})")
