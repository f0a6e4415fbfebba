"""`edgert eval`: the strided windows, the held-out/calibration split, perplexity against
transformers' own loss on a tiny model, a bundle against itself (KL 0, full agreement), the
CLI, and the memory probe."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgert.bundle import Bundle
from edgert.tools.evaluate import (
    HELDOUT_EVERY,
    HELDOUT_SLOT,
    EvalConfig,
    GraphScorer,
    _topics,
    evaluate_bundle,
    evaluate_tokens,
    heldout_text,
    measure_process,
    plan_windows,
)
from export import texts
from export.bundle_writer import write_bundle
from export.gates import quality_gate
from export.pipeline import load_source
from export.texts import calibration_text
from tests.tiny_models import VOCAB, make_tiny


@pytest.mark.parametrize("n,window,stride,tokens", [(5000, 512, 256, 2000), (700, 64, 48, 600),
                                                    (100, 16, 15, 99)])
def test_windows_score_every_target_once_with_context(n, window, stride, tokens):
    cfg = EvalConfig(window=window, stride=stride, tokens=tokens)
    wins = plan_windows(n, cfg)
    scored = [t for _, end, first in wins for t in range(first, end)]
    assert scored == list(range(1, len(scored) + 1)), "contiguous, no target twice"
    assert len(scored) >= tokens
    for i, (begin, end, first) in enumerate(wins):
        assert end - begin <= window and begin < first
        if i:
            assert first - begin >= window - stride  # context of every later window
    with pytest.raises(ValueError, match="too few"):
        plan_windows(50, EvalConfig(window=16, stride=8, tokens=100))


def test_heldout_and_calibration_texts_are_disjoint():
    """The runtime's held-out text and the exporter's calibration text state the same split in
    two files (the runtime never imports the exporter): disjoint, and together every topic."""
    assert (texts.EVAL_EVERY, texts.EVAL_SLOT) == (HELDOUT_EVERY, HELDOUT_SLOT)
    topics = _topics()
    held = heldout_text()
    calib = calibration_text()
    assert len(held) > 50_000 and len(calib) > len(held)
    for i, (_, text) in enumerate(topics):
        if len(text) < 200:
            continue
        assert text in held or text in calib, f"topic {i} unused"
        if text in held:
            assert text not in calib, f"topic {i} is in both texts"
            assert i % HELDOUT_EVERY == 1


def test_gates_are_defined_for_every_quantized_configuration():
    assert quality_gate("fp32", "portable", True) is None
    assert quality_gate("int8", "cpu", True) == 0.01
    assert quality_gate("int8", "portable", True) == 0.03
    assert quality_gate("int4", "cpu", False) == 0.05
    assert quality_gate("int4", "portable", True) == 0.15


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltiny")
    model, path = make_tiny("llama", root / "hf")
    bundle = Bundle.load(write_bundle(load_source(path), root / "b", progress=False))
    return model, bundle


def test_perplexity_matches_transformers(tiny):
    """Our strided windows through the paged graph vs transformers' own loss on the same
    windows (first window whole, later ones only their last `stride` targets)."""
    model, bundle = tiny
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=300)
    cfg = EvalConfig(window=64, stride=32, tokens=200)
    res = evaluate_tokens(GraphScorer.from_bundle(bundle), tokens, cfg)
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, first in plan_windows(len(tokens), cfg):
            ids = torch.tensor(tokens[begin:end])[None]
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            rows = torch.arange(first - 1 - begin, end - 1 - begin)
            nll -= float(logp[rows, torch.tensor(tokens[first:end])].sum())
            n += end - first
    assert res.scored_tokens == n
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_a_bundle_against_itself(tiny):
    _, bundle = tiny
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=200)
    s = GraphScorer.from_bundle(bundle)
    res = evaluate_tokens(s, tokens, EvalConfig(window=32, stride=16, tokens=100), s)
    assert res.top1_agreement == 1.0
    assert abs(res.mean_kl) < 1e-6
    assert res.perplexity == pytest.approx(res.reference_perplexity)
    assert res.perplexity_rise == pytest.approx(0.0, abs=1e-9)


def test_eval_cli_json(tiny):
    _, bundle = tiny
    proc = subprocess.run(
        [sys.executable, "-m", "edgert", "eval", str(bundle.path), "--reference",
         str(bundle.path), "--tokens", "256", "--window", "64", "--stride", "32", "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["scored_tokens"] >= 256 and out["top1_agreement"] == 1.0
    assert out["bundle_bytes"] > 0 and out["memory"]["peak_rss_kib"] > 0
    assert out["perplexity_rise"] == pytest.approx(0.0, abs=1e-9)


def test_memory_probe_reports_peak_and_speed(tiny):
    _, bundle = tiny
    m = measure_process(bundle, tokens=8, streams=(1, 4), kv_memory=4 << 20)
    assert m["peak_rss_kib"] >= m["after_load_kib"] > 0
    assert m["decode_tokens_per_s_1"] > 0 and m["decode_tokens_per_s_4"] > 0


def test_evaluate_bundle_refuses_a_foreign_reference(tiny, tmp_path):
    """A reference with another vocabulary, or one that tokenizes the held-out text otherwise,
    is refused (its scores would be compared position by position with the wrong tokens); one
    with the same tokenizer is accepted and really compared."""
    import dataclasses
    import shutil

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    _, bundle = tiny
    _, path = make_tiny("qwen2", tmp_path / "hf")
    other = Bundle.load(write_bundle(load_source(path), tmp_path / "b", progress=False))
    cfg = EvalConfig(window=64, stride=32, tokens=100)
    res = evaluate_bundle(bundle, None, cfg)
    assert res.perplexity > 0 and res.top1_agreement is None
    # same word-level vocabulary, so the reference is accepted and compared: two different
    # random models disagree
    res = evaluate_bundle(bundle, other, cfg)
    assert 0 <= res.top1_agreement < 1 and res.mean_kl > 0
    assert res.reference_perplexity > 0 and res.reference_perplexity != res.perplexity
    wider = dataclasses.replace(other, manifest={
        **other.manifest, "config": {**other.manifest["config"], "vocab_size": VOCAB + 1}})
    with pytest.raises(ValueError, match="different vocabulary"):
        evaluate_bundle(bundle, wider, cfg)
    # the same vocabulary size, its words numbered otherwise
    shutil.copytree(other.path, tmp_path / "renumbered")
    ids = np.random.default_rng(0).permutation(VOCAB).tolist()
    tok = HFTokenizer(models.WordLevel({f"w{i}": ids[i] for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "renumbered" / other.manifest["tokenizer"]["file"]))
    renumbered = dataclasses.replace(other, path=tmp_path / "renumbered")
    with pytest.raises(ValueError, match="tokenizes the held-out text differently"):
        evaluate_bundle(bundle, renumbered, cfg)
