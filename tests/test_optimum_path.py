"""`edgert export --via optimum` and the dense-past adapter, end to end with nothing mocked:
tiny random checkpoints of architectures the native builder lacks (GPT-NeoX: MHA, partial
rotary, parallel residual; StableLM: GQA, LayerNorm, partial rotary, qkv bias; Phi-3: GQA,
fused projections; GLM: GQA, head_dim 24 != hidden / heads, interleaved partial rotary) are
made by transformers inside the optimum venv, exported by optimum,
written as bundles and served by the runtime's own pool, engine and sampler.

One venv is created per cache (git-ignored .cache/edgert/envs/optimum, reused across runs);
after that the module costs a few seconds per architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgert.bundle import Bundle, BundleError
from edgert.engine import LLM, EngineConfig
from edgert.runner.dense_backend import DenseBackend
from edgert.runner.step_inputs import layout
from edgert.sampling_params import SamplingParams
from export.optimum_env import ensure_optimum_env, run_in_env
from export.optimum_export import OptimumExportError, export_via_optimum

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("gpt_neox", "stablelm", "phi3", "glm")
PREFILL = 24  # then 20 decode steps: tests/optimum_tiny.py's reference covers 44 positions


@pytest.fixture(scope="module")
def optimum_python(cache_dir: Path) -> Path:
    return ensure_optimum_env(cache_dir)


@pytest.fixture(scope="module")
def exported(optimum_python: Path, cache_dir: Path, tmp_path_factory) -> dict[str, tuple]:
    """arch -> (bundle, reference ids, reference logits)."""
    root = tmp_path_factory.mktemp("optimum")
    made = run_in_env(optimum_python, [str(REPO / "tests" / "optimum_tiny.py"),
                                       *(x for arch in ARCHS for x in (arch, str(root / arch)))],
                      quiet=True)
    assert made.returncode == 0, made.stderr[-2000:]
    out = {}
    for arch in ARCHS:
        ckpt = root / arch
        bundle = Bundle.load(export_via_optimum(ckpt, root / f"{arch}-bundle", progress=False,
                                                cache_dir=cache_dir))
        ref = np.load(ckpt / "reference.npz")
        out[arch] = (bundle, ref["ids"], ref["logits"])
    return out


def test_manifest_records_the_dense_convention(exported):
    bundle, _, _ = exported["stablelm"]
    g = bundle.graph
    assert bundle.convention == "dense-past" and g["flavour"] == "optimum"
    assert g["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids"}
    assert g["past"][1] == ["past_key_values.1.key", "past_key_values.1.value"]
    assert g["present"][0] == ["present.0.key", "present.0.value"]
    assert g["past_layout"] == ["batch", "kv_heads", "past_len", "head_dim"]
    assert "pools" not in g  # nothing paged-only can mistake it for a native graph
    cfg = bundle.config  # geometry from the graph: StableLM here has GQA 4 -> 2 heads
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == ("stablelm", 2, 4, 2, 16, 96)
    assert cfg.rope_theta == 30.0 and cfg.attention_bias
    assert bundle.kv["layout"] == ["num_blocks", "kv_heads", "block_size", "head_dim"]
    assert bundle.tokenizer_info["eos_token_ids"] == [2]
    assert set(bundle.manifest["files"]) == {"model.onnx", "tokenizer.json"}
    glm = exported["glm"][0].config
    assert (glm.num_heads, glm.num_kv_heads, glm.head_dim, glm.hidden_size) == (4, 2, 24, 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_through_the_pool_match_transformers(exported, arch):
    """A 24-token prefill, then 20 decode steps, through a pool full of garbage with shuffled
    block ids and a block table wider than needed (padding in the dense past): every position's
    logits equal transformers' causal forward over the whole sequence."""
    bundle, ids, want = exported[arch]
    bs, nb = 4, 40
    backend = DenseBackend(bundle, nb, bs)
    rng = np.random.default_rng(1)
    data = backend.pool.data
    data[:, :, 1:] = rng.normal(0, 3, data[:, :, 1:].shape)  # the null block stays zero
    free = [int(b) for b in rng.permutation(np.arange(1, nb))]
    blocks: list[int] = []

    def call(start: int, toks: list[int], width: int) -> np.ndarray:
        while len(blocks) * bs < start + len(toks):
            blocks.append(free.pop())
        step = layout((2, len(toks), width), [toks], [start], [blocks], [range(len(toks))], bs)
        return backend.run(step.inputs, step.slot_mapping)  # row 1 of the call is padding

    got = [call(0, [int(t) for t in ids[:PREFILL]], 9)]
    for i in range(PREFILL, len(ids)):
        got.append(call(i, [int(ids[i])], 16))
    diff = np.abs(np.concatenate(got) - want).max()
    assert diff < 1e-4, f"{arch}: max |logits - transformers| = {diff:.2e}"


def _prompts(n: int = 6) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(3, 96, int(rng.integers(3, 30)))] for _ in range(n)]


@pytest.mark.parametrize("arch", ("gpt_neox", "phi3"))
def test_engine_batched_equals_sequential(exported, arch):
    """Through the real engine (scheduler, paged pool, chunked prefill, sampler): the greedy
    tokens of a batch equal each prompt run alone. The logprobs agree closely but are NOT
    required to be bit-identical: a dense graph's softmax and GEMMs run over the padded past of
    whatever block-table width the batch needs (the native graph's invariance does not carry
    over; README has the measured count)."""
    bundle = exported[arch][0]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    cfg = EngineConfig(kv_memory=4 << 20, max_num_seqs=8, max_num_batched_tokens=32,
                       block_size=4, verify_bundle=False)
    llm = LLM(bundle, cfg)
    prompts = _prompts()
    alone = [llm.generate([p], params)[0].choices[0] for p in prompts]
    batched = [c.choices[0] for c in llm.generate(prompts, params)]
    assert llm.engine.stats.max_decode_batch >= 4
    for a, b in zip(alone, batched, strict=True):
        assert a.token_ids == b.token_ids
        la = np.array([lp.logprob for lp in a.logprobs])
        lb = np.array([lp.logprob for lp in b.logprobs])
        np.testing.assert_allclose(la, lb, atol=1e-5)


def test_engine_preempts_and_reuses_prefixes_on_a_dense_bundle(exported):
    """A pool too small for the batch (waits, preemption and recomputation) with the prefix
    cache on: the adapter reads whatever blocks the allocator hands it, so the greedy tokens
    are still each prompt's own."""
    from edgert.engine import LLMEngine

    bundle = exported["stablelm"][0]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    per_block = 2 * 2 * 2 * 4 * 16 * 4  # layers x K,V x kv heads x block x head_dim x fp32
    cfg = EngineConfig(kv_memory=21 * per_block, max_num_seqs=8, max_num_batched_tokens=32,
                       block_size=4, max_model_len=64, enable_prefix_caching=True,
                       verify_bundle=False)
    shared = [int(t) for t in np.random.default_rng(9).integers(3, 96, 12)]
    prompts = [shared + p for p in _prompts()]
    alone = [LLM(bundle, cfg).generate([p], params)[0].choices[0].token_ids for p in prompts]
    engine = LLMEngine(bundle, cfg)
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    got: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(ids[out.request_id], []).extend(out.token_ids)
    assert engine.stats.preemptions > 0 and engine.allocator.stats.prefix_hit_tokens > 0
    assert [got[i] for i in range(len(prompts))] == alone
    assert engine.pool_usage().used == 0


def test_eval_scores_a_dense_bundle(exported):
    """`edgert eval`'s scorer runs dense bundles through the adapter: its log-probs are the
    log-softmax of transformers' logits."""
    from edgert.tools.evaluate import GraphScorer

    bundle, ids, want = exported["gpt_neox"]
    lp = GraphScorer.from_bundle(bundle, threads=2).logprobs(ids, 0)
    z = want[:-1] - want[:-1].max(-1, keepdims=True)
    np.testing.assert_allclose(lp, z - np.log(np.exp(z).sum(-1, keepdims=True)), atol=1e-4)


def test_paged_only_consumers_refuse_a_dense_bundle(exported):
    from edgert.runner.ort_backend import OrtBackend
    from export.trt_check import check_bundle
    from tests.paged_runner import PagedRunner

    bundle = exported["phi3"][0]
    for make in (lambda: OrtBackend(bundle, 8, 4), lambda: PagedRunner(bundle),
                 lambda: check_bundle(bundle.path)):
        with pytest.raises(BundleError, match="needs a paged-KV graph.*dense-past"):
            make()


def test_export_errors_are_clear(optimum_python, cache_dir, tmp_path):
    with pytest.raises(OptimumExportError, match="not a Hugging Face checkpoint directory"):
        export_via_optimum(tmp_path / "nothing", tmp_path / "b1", cache_dir=cache_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(OptimumExportError, match="checkpoint directories only"):
        export_via_optimum(gguf, tmp_path / "b2", cache_dir=cache_dir)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(OptimumExportError, match="cannot export model_type 'bert'.*gpt_neox"):
        export_via_optimum(bert, tmp_path / "b3", cache_dir=cache_dir, progress=False)
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(OptimumExportError, match="ALiBi"):
        export_via_optimum(bloom, tmp_path / "b4", cache_dir=cache_dir)
    # optimum exports Gemma without position_ids: it would number the padded past
    done = run_in_env(optimum_python, [str(REPO / "tests" / "optimum_tiny.py"), "gemma",
                                       str(tmp_path / "gemma")], quiet=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(OptimumExportError, match="lacks position_ids"):
        export_via_optimum(tmp_path / "gemma", tmp_path / "b5", cache_dir=cache_dir,
                           progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "bloom", "gemma", "m.gguf"]


def test_cli_via_flag(optimum_python, cache_dir, tmp_path, capsys):
    """--via native names the builder it chose; --via optimum writes a dense bundle (from a
    checkpoint saved by transformers 5, whose rope_parameters the exporter's transformers 4.57
    would otherwise ignore: the logits are checked against transformers 5) and refuses
    precisions it does not implement."""
    from edgert.tools.cli import main
    from edgert.tools.evaluate import GraphScorer
    from tests.tiny_models import make_tiny, reference_logits

    model, llama = make_tiny("llama", tmp_path / "llama")
    assert main(["export", str(llama), "-o", str(tmp_path / "native"), "--no-progress"]) == 0
    assert "llama: native paged graph builder" in capsys.readouterr().out
    assert main(["export", str(llama), "-o", str(tmp_path / "dense"), "--via", "optimum",
                 "--no-progress", "--cache-dir", str(cache_dir)]) == 0
    dense = Bundle.load(tmp_path / "dense")
    assert dense.convention == "dense-past"
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 128, 40)]
    want = reference_logits(model, ids)[:-1]
    z = want - want.max(-1, keepdims=True)
    lp = GraphScorer.from_bundle(dense, threads=2).logprobs(np.asarray(ids), 0)
    np.testing.assert_allclose(lp, z - np.log(np.exp(z).sum(-1, keepdims=True)), atol=1e-4)
    assert main(["export", str(llama), "-o", str(tmp_path / "q"), "--via", "optimum",
                 "--precision", "int4", "--cache-dir", str(cache_dir)]) != 0
    assert "--via optimum writes --precision fp32 or int8" in capsys.readouterr().err
    # int8 goes through the quality gate (scored against the fp32 export; --force keeps it
    # whatever a random model's perplexity does)
    assert main(["export", str(llama), "-o", str(tmp_path / "q8"), "--via", "optimum",
                 "--precision", "int8", "--eval-tokens", "256", "--force", "--no-progress",
                 "--cache-dir", str(cache_dir)]) == 0
    printed = capsys.readouterr().out
    assert "reference perplexity" in printed and "wrote" in printed, printed
    q8 = Bundle.load(tmp_path / "q8")
    assert q8.precision == "int8" and q8.convention == "dense-past"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_int8_dense_bundle(exported, tmp_path):
    """The weight-only int8 twin: MatMulNBits(bits=8) in the graph, the manifest says how it
    was made, it tracks the fp32 logits, and a row's answer does not depend on its neighbours
    more than the fp32 dense graph's does (per-row activation scales)."""
    import onnx

    from export.optimum_quant import quantize_dense_bundle

    bundle, ids, want = exported["stablelm"]
    q = Bundle.load(quantize_dense_bundle(bundle.path, tmp_path / "int8"))
    assert q.precision == "int8" and q.manifest["quantization"]["int8_matmuls"] > 0
    ops = {n.op_type for n in onnx.load(str(q.model_path)).graph.node}
    assert "MatMulNBits" in ops and not {"MatMulInteger", "DynamicQuantizeLinear"} & ops
    backend = DenseBackend(q, 16, 4)
    step = layout((1, len(ids), -(-len(ids) // 4)), [[int(t) for t in ids]], [0], [
        list(range(1, 12))], [range(len(ids))], 4)
    got = backend.run(step.inputs, step.slot_mapping)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8
    assert np.abs(got - want).mean() < 0.15 * np.abs(want).mean()
    # the same row beside a neighbour of other tokens, same call width: the same logits
    # within float rounding (a per-tensor activation scale moved them by whole int8 steps)
    other = [int(t) for t in np.random.default_rng(9).integers(3, 60, size=len(ids))]
    backend2 = DenseBackend(q, 32, 4)
    blocks = -(-len(ids) // 4)
    pair = layout((2, len(ids), blocks), [[int(t) for t in ids], other], [0, 0], [
        list(range(1, 1 + blocks)), list(range(1 + blocks, 1 + 2 * blocks))],
        [range(len(ids)), range(len(ids))], 4)
    both = backend2.run(pair.inputs, pair.slot_mapping)
    np.testing.assert_allclose(both[:len(ids)], got, atol=1e-4)
