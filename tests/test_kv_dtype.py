"""A float16 KV pool under a float32 graph (`edgert export --kv-dtype float16`): half the pool's
bytes, the graph still computing in float32. The graph rounds the step's new K/V to float16
before they join the gathered past, so what it computes is exactly "float32 attention over
float16 keys and values": checked against transformers with its K/V rounded the same way, and
against plain transformers for what the rounding costs. Batch invariance still holds bit for
bit, through the graph and through the engine; the pool, the manifest and the fit plan count
2 bytes per value. Tiny random checkpoints: seconds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from edgert.bundle import Bundle
from edgert.config import EngineConfig
from edgert.engine import LLMEngine
from edgert.engine.device_fit import plan_for_device
from edgert.runner.kv_pool import KVPool
from export.bundle_writer import write_bundle
from export.pipeline import load_source
from export.quantize import QuantConfig
from tests.paged_runner import PagedRunner
from tests.test_batch_invariance import _check_invariance
from tests.tiny_models import VOCAB, make_tiny, reference_logits

# GQA; MHA (its zero query row); q/k norms and a head_dim that is not hidden / heads.
ARCHS = ["llama", "llama-mha", "qwen3"]
KV16 = QuantConfig(kv_dtype="float16")
# Tolerances as a fraction of max|logit| (about 10 on these models). float16 keeps 11 significant
# bits: unit roundoff u = 2^-11 = 4.9e-4.
# - Against transformers with its K/V rounded to float16 where the graph rounds them (after
#   RoPE / k_norm, before attention): the graph's float32 K/V differ from torch's in the last
#   bits, so an element lying on a float16 rounding boundary can round one float16 step the
#   other way. Measured 0.6e-5 to 1.3e-4; the tolerance is u. The rounding itself moves the
#   logits 1.2e-3 to 3.1e-3 (2.4-6x the tolerance), so a graph rounding elsewhere, or attending
#   its new tokens unrounded (a whole prefill would then match plain transformers), fails here.
# - Against plain float32 transformers, what a float16 pool costs: measured 0.12-0.31% on these
#   deliberately sharp models (weights of std 0.3, low RoPE theta); the tolerance is 1% (20 u).
ROUNDED_RTOL = 2.0 ** -11
PLAIN_RTOL = 1e-2


def _kv_float16_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention over K/V rounded to float16 (still computed in float32)."""
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key.half().float(),
                                           value.half().float(), attention_mask, **kwargs)


AttentionInterface.register("kv_float16", _kv_float16_attention)


def _reference_kv16(model, ids: list[int]) -> np.ndarray:
    impl = model.config._attn_implementation
    model.config._attn_implementation = "kv_float16"
    try:
        return reference_logits(model, ids)
    finally:
        model.config._attn_implementation = impl


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, ckpt_dir = make_tiny(arch, root / "hf", tie=(arch == "qwen3"))
    bundle = Bundle.load(write_bundle(load_source(ckpt_dir), root / "kv16", progress=False,
                                      quant=KV16))
    return arch, model, bundle


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """One tiny Llama exported with a float32 and with a float16 pool, and int8 cpu with a
    float16 pool (round to nearest, no smoothing: no calibration needed), in blocks of 16 tokens:
    the prompts below are sized for them."""
    root = tmp_path_factory.mktemp("pair")
    _, ckpt_dir = make_tiny("llama", root / "hf", seed=5)
    ckpt = load_source(ckpt_dir)
    return {key: Bundle.load(write_bundle(ckpt, root / key, block_size=16, progress=False,
                                          quant=q))
            for key, q in (("kv32", None), ("kv16", KV16),
                           ("int8-kv16", QuantConfig(precision="int8", method="rtn",
                                                     smooth_alpha=0, kv_dtype="float16")))}


def test_prefill_then_decode_matches_transformers(tiny):
    """Every prefill length 1..40, then 20 decode steps through the pool (block size 4, shuffled
    blocks full of garbage): the graph is transformers with float16 K/V, within u."""
    arch, model, bundle = tiny
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(0, VOCAB, size=60)]
    ref, ref16 = reference_logits(model, ids), _reference_kv16(model, ids)
    scale = float(np.abs(ref).max())
    runner = PagedRunner(bundle, block_size=4, num_blocks=40, seed=7)
    worst = worst_plain = 0.0
    for n in range(1, 41):
        got = [runner.run([(0, ids[:n])])[0]]
        for t in range(n, n + 20):
            got.append(runner.run([(0, [ids[t]])])[0])
        runner.release(0)
        got = np.concatenate(got)
        worst = max(worst, float(np.abs(got - ref16[: n + 20]).max()) / scale)
        worst_plain = max(worst_plain, float(np.abs(got - ref[: n + 20]).max()) / scale)
        assert worst <= ROUNDED_RTOL, f"{arch}: prefill {n}: {worst:.2e} of max|logit|"
        assert worst_plain <= PLAIN_RTOL, f"{arch}: prefill {n}: {worst_plain:.2e} vs float32"
    print(f"{arch}: {worst:.1e} of max|logit| from transformers with float16 K/V, "
          f"{worst_plain:.1e} from float32 transformers")


def test_graph_types_and_the_pools_sole_consumer(tiny):
    """Pools and new_kv float16, activations and logits float32; each pool read by its GatherND
    alone, in the ONNX and in the graph ONNX Runtime actually runs (it inserts no Cast: its CPU
    GatherND and ScatterND take float16)."""
    _, _, bundle = tiny
    assert bundle.kv["dtype"] == "float16" and bundle.graph["activation_dtype"] == "float32"
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    pools = {n for pair in bundle.graph["pools"] for n in pair}
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input,
                                                            *model.graph.output]}
    assert {types[p] for p in pools} == {f16}
    assert types[bundle.graph["outputs"]["new_kv"]] == f16
    assert types[bundle.graph["outputs"]["logits"]] == f32

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # the runtime's
    opts.log_severity_level = 3  # not the warning that an optimized model is CPU-specific
    opts.optimized_model_filepath = str(bundle.path.parent / f"{bundle.path.name}.opt.onnx")
    ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    for m in (model, onnx.load(opts.optimized_model_filepath, load_external_data=False)):
        consumers: dict[str, list[str]] = {}
        for node in m.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node.op_type)
        for node in m.graph.node:
            if node.op_type == "GatherND":
                assert node.input[0] in pools
                # float16 blocks straight into ScatterND (layer 0's also feed the Shapes of
                # the index arithmetic): no Cast of the gathered past before the new K/V join
                assert set(consumers[node.output[0]]) <= {"ScatterND", "Shape"}
        for pool in pools:
            assert consumers.get(pool) == ["GatherND"], f"{pool}: {consumers.get(pool)}"


@pytest.mark.parametrize("key", ["kv16", "int8-kv16"])
def test_chunked_and_batched_are_bit_identical(llama_pair, key):
    """A sequence's logits, bit for bit: whole prefill + decodes, the same prompt in chunks, and
    the same again batched with two others (other lengths, other chunks, other blocks)."""
    bundle = llama_pair[key]
    rng = np.random.default_rng(4)
    seqs = [[int(t) for t in rng.integers(0, VOCAB, size=n)] for n in (31, 19, 44)]
    prompt, decodes = seqs[0][:23], seqs[0][23:]

    def alone(chunks: list[int], seed: int) -> np.ndarray:
        runner, out, at = PagedRunner(bundle, block_size=4, num_blocks=64, seed=seed), [], 0
        for c in chunks:
            out.append(runner.run([(0, prompt[at:at + c])])[0])
            at += c
        out += [runner.run([(0, [t])])[0] for t in decodes]
        return np.concatenate(out)

    whole = alone([23], 1)
    assert np.array_equal(alone([5, 1, 9, 8], 2), whole), f"{key}: chunked prefill differs"
    runner = PagedRunner(bundle, block_size=4, num_blocks=96, seed=3)
    got = [runner.run([(1, seqs[1][:7]), (0, prompt[:11]), (2, seqs[2][:30])])[1],
           runner.run([(0, prompt[11:]), (2, seqs[2][30:31]), (1, seqs[1][7:8])])[0]]
    for i, t in enumerate(decodes):
        got.append(runner.run([(2, [seqs[2][31 + i]]), (0, [t]), (1, [seqs[1][8 + i]])])[1])
    assert np.array_equal(np.concatenate(got), whole), f"{key}: batched differs from alone"


def test_engine_is_bit_exact_under_any_batch(llama_pair):
    """The engine's own float16 pool (runner/kv_pool.py): alone, batched with a prefix hit,
    chunked, preempted and recomputed, three at a time: every logprob identical."""
    rng = np.random.default_rng(9)
    system = [int(t) for t in rng.integers(3, VOCAB, size=20)]  # a shared block of 16
    prompts = [system + [int(t) for t in rng.integers(3, VOCAB, size=n)] for n in (9, 10)]
    # lengths that cross block boundaries together in a pool of 7 blocks: a preemption
    prompts += [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in (14, 13, 30, 12)]
    _check_invariance(llama_pair["kv16"], "fp32 graph, float16 KV", prompts)


def test_pool_and_plan_count_two_bytes(llama_pair):
    """The engine's pool is float16 and holds twice the blocks in the same bytes; `edgert plan`
    gives the same memory twice the blocks."""
    kv32, kv16 = llama_pair["kv32"], llama_pair["kv16"]
    assert kv32.kv["dtype"] == "float32" and kv16.kv["dtype"] == "float16"
    assert llama_pair["int8-kv16"].kv["dtype"] == "float16"
    cfg = kv16.config
    engines = {}
    for name, b in (("kv32", kv32), ("kv16", kv16)):
        engines[name] = LLMEngine(b, EngineConfig(kv_memory=4 << 20, block_size=16,
                                                  verify_bundle=False))
    pool16, pool32 = (engines[k].runner.backend.pool for k in ("kv16", "kv32"))
    assert pool16.data.dtype == np.float16 and pool32.data.dtype == np.float32
    assert engines["kv16"].block_bytes * 2 == engines["kv32"].block_bytes
    assert engines["kv16"].block_bytes == cfg.kv_bytes_per_token(2) * 16
    blocks = [KVPool.num_blocks_for_budget(4 << 20, cfg.num_layers, cfg.num_kv_heads,
                                           cfg.head_dim, 16, b.kv["dtype"]) for b in (kv32, kv16)]
    assert blocks[1] == 2 * blocks[0] and pool16.num_blocks == blocks[1]
    plans = [plan_for_device(b, EngineConfig(kv_memory=None, block_size=4), "orin-nano-8gb",
                             context=64, concurrency=4, measure=False) for b in (kv32, kv16)]
    assert plans[1].num_blocks == plans[1].pool_bytes // (cfg.kv_bytes_per_token(2) * 4)
    # the same memory left for the pool (the graphs differ by a few hundred bytes of Casts)
    assert abs(plans[0].pool_bytes - plans[1].pool_bytes) < 4096
    assert abs(plans[1].num_blocks - 2 * plans[0].num_blocks) <= 8


def test_kv_dtype_options():
    """auto is the activation dtype; float32 under a float16 graph is refused."""
    assert QuantConfig().kv_pool_dtype == "float32"
    assert QuantConfig(precision="int4", kv_dtype="float16").kv_pool_dtype == "float16"
    assert QuantConfig(precision="fp16").kv_pool_dtype == "float16"
    assert QuantConfig(precision="int8", flavour="portable",
                       kv_dtype="float16").kv_pool_dtype == "float16"
    for kw in (dict(precision="fp16"), dict(precision="int4", flavour="portable")):
        with pytest.raises(ValueError, match="float32 graph"):
            QuantConfig(**kw, kv_dtype="float32")
    with pytest.raises(ValueError, match="KV dtype"):
        QuantConfig(kv_dtype="bfloat16")


def test_export_cli(tmp_path):
    """`edgert export --kv-dtype float16` of a float graph is scored against the float32 pool's
    graph (the summary printed, held to fp16's gate: the pool rounds every cached K/V);
    float32 under a float16 graph is refused."""
    import subprocess
    import sys

    _, hf = make_tiny("llama", tmp_path / "hf")
    base = [sys.executable, "-m", "edgert", "export", str(hf), "--no-progress"]
    proc = subprocess.run([*base, "-o", str(tmp_path / "b"), "--kv-dtype", "float16",
                           "--eval-tokens", "300"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "KV float16" in proc.stdout and "top-1 agreement" in proc.stdout, proc.stdout
    assert "(gate +0.5%)" in proc.stdout, proc.stdout
    assert Bundle.load(tmp_path / "b").kv["dtype"] == "float16"
    proc = subprocess.run([*base, "-o", str(tmp_path / "c"), "--precision", "fp16",
                           "--kv-dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a float32 graph" in proc.stdout + proc.stderr
    assert not (tmp_path / "c").exists()
