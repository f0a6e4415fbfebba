"""The native builder beyond Llama: Phi-3 (fused projections, partial rotary, LongRoPE, sliding
window), Gemma 2 (GeGLU, embedding scale, sandwich norms, both soft-caps, a sliding window on
alternate layers) and Mistral's sliding window, each against transformers' forward pass on a tiny
random checkpoint, through the paged pool and through the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert.bundle import Bundle
from export.bundle_writer import write_bundle
from export.hf_loader import UnsupportedModelError, load_hf_checkpoint
from export.pipeline import load_source
from tests.paged_runner import PagedRunner
from tests.test_batch_invariance import _check_invariance
from tests.tiny_models import VOCAB, make_tiny, reference_logits

ATOL = 1e-4
ARCHS = ["phi3", "phi3-partial", "gemma2", "mistral-swa"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, ckpt_dir = make_tiny(arch, root / "hf")
    # block size 4: a 12-token answer grows by three blocks, so a small pool must preempt
    bundle = Bundle.load(write_bundle(load_source(ckpt_dir), root / "bundle", block_size=4,
                                      progress=False))
    return arch, model, bundle


def test_prefill_then_decode_matches_transformers(tiny):
    """Prefills of 1..40 tokens, each followed by 20 decode steps through the pool (block size
    4, shuffled blocks full of garbage): logits equal transformers' within 1e-4. Contexts reach
    60 tokens, far past the 12-token windows, so the windowed mask is exercised."""
    arch, model, bundle = tiny
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(0, VOCAB, size=60)]
    ref = reference_logits(model, ids)
    assert np.abs(ref).max() > 1.0  # a reference far from trivial
    runner = PagedRunner(bundle, block_size=4, num_blocks=40, seed=7)
    for n in (1, 2, 5, 11, 12, 13, 17, 24, 31, 40):
        got = [runner.run([(0, ids[:n])])[0]]
        for t in range(n, n + 20):
            got.append(runner.run([(0, [ids[t]])])[0])
        runner.release(0)
        diff = np.abs(np.concatenate(got) - ref[: n + 20]).max()
        assert diff <= ATOL, f"{arch}: prefill {n}: max abs diff {diff}"


def test_window_changes_the_answer(tiny):
    """The reference itself depends on the window (so the match above is not a full-attention
    coincidence): transformers with the window widened to the whole context differs."""
    arch, model, _ = tiny
    ids = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, size=40)]
    ref = reference_logits(model, ids)
    window = model.config.sliding_window
    model.config.sliding_window = 4096
    for layer in model.model.layers:  # Gemma 2 reads it per layer at construction
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 4096
    try:
        wide = reference_logits(model, ids)
    finally:
        model.config.sliding_window = window
        for layer in model.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = window
    if arch == "phi3":  # the plain Phi-3 has no window
        np.testing.assert_array_equal(ref, wide)
    else:
        assert np.abs(ref[20:] - wide[20:]).max() > 1e-2


def test_batched_equals_sequential_bit_for_bit(tiny):
    """Through the real engine: each prompt's greedy tokens, logprobs and top-5 are identical
    batched, chunked, preempted and run alone."""
    arch, _, bundle = tiny
    rng = np.random.default_rng(5)
    # two blocks shared (the prefix cache); answers grow by three 4-token blocks, so the
    # invariance check's pool of 7 (6 usable) must preempt
    shared = [int(t) for t in rng.integers(3, VOCAB, size=8)]
    prompts = [shared + [int(t) for t in rng.integers(3, VOCAB, size=n)] for n in (2, 3)]
    prompts += [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in (11, 9, 12, 1)]
    _check_invariance(bundle, arch, prompts)


def test_configs_read_as_transformers_reads_them(tmp_path: Path):
    _, phi = make_tiny("phi3-partial", tmp_path / "phi")
    cfg = load_hf_checkpoint(phi).config
    assert (cfg.architecture, cfg.rotary_dim, cfg.rope_dims) == ("phi3", 8, 8)
    assert cfg.sliding_window == 12 and cfg.sliding_window_layers == (0, 1)
    # LongRoPE keeps to its short factors, and so to the pretraining context
    assert cfg.max_position_embeddings == 256
    assert cfg.rope_scaling["attention_factor"] == pytest.approx((1 + np.log(4) / np.log(256))
                                                                 ** 0.5)
    _, gem = make_tiny("gemma2", tmp_path / "gemma")
    cfg = load_hf_checkpoint(gem).config
    assert cfg.sliding_window_layers == (0,)  # alternate layers, the first one sliding
    assert (cfg.hidden_act, cfg.sandwich_norms, cfg.embedding_multiplier) == ("gelu_tanh", True,
                                                                              8.0)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (3.0, 5.0)
    assert cfg.attention_scale == pytest.approx(20 ** -0.5)
    # the manifest round trip keeps the config equal (a tuple comes back from a JSON list)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_unknown_architecture_names_both_paths(tmp_path: Path):
    import json

    _, path = make_tiny("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="--via optimum") as e:
        load_hf_checkpoint(path)
    assert "native paged graph builder" in str(e.value) and "Gemma2ForCausalLM" in str(e.value)


def test_unknown_layer_type_refused(tmp_path: Path):
    import json

    _, path = make_tiny("gemma2", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_types"] = ["chunked_attention", "full_attention"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        load_hf_checkpoint(path)
