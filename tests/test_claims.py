"""scripts/claims.py --quick on a tiny random bundle: the report and its plots are written, and
the figures show what each claim says. Wall times on a tiny model are noise, so the assertions
hold on the counts the engine makes deterministically (tokens computed, engine steps, token
slots, blocks), which are what carry the claims on the real model too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_bundles import make_bundle

REPO = Path(__file__).resolve().parent.parent
PLOTS = ("a_kv_cache.png", "b_batching.png", "c_memory.png", "d_quantization.png",
         "e_concurrency.png")


@pytest.fixture(scope="module")
def claims(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("claims")
    bundle = make_bundle(root, "tiny", seed=3)
    out = root / "report"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "claims.py"), str(bundle),
                           "--quick", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "claims.json").read_text())


def test_report_and_plots_exist(claims):
    out, res = claims
    text = (out / "claims.md").read_text()
    for heading in ("(a) With vs without a KV cache", "(b) Static vs continuous",
                    "(c) Paged pool", "(d) Quantization", "(e) TTFT, TPOT"):
        assert heading in text
    assert "avx2" in text and "Other processes used" in text
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in text


def test_without_a_cache_every_token_recomputes_the_context(claims):
    """Without: each of a turn's T tokens prefills the whole context again, exactly
    T * context + T(T-1)/2 tokens. With: only the new user tokens, at most one partly filled
    block of the history, and the decode rows, so its cost stays flat as the talk grows."""
    _, res = claims
    sizes, kv = res["sizes"], res["kv_cache"]
    t, block = sizes["turn_tokens"], res["memory"]["block_size"]  # the same engine's blocks
    for turn in kv["turns"]:
        assert turn["without_computed"] == t * turn["context"] + t * (t - 1) // 2
        assert turn["with_computed"] <= sizes["user_tokens"] + block + t - 1
    first, last = kv["turns"][0], kv["turns"][-1]
    assert (last["without_computed"] - first["without_computed"]
            > 10 * (last["with_computed"] - first["with_computed"]))
    assert kv["identical"], "a cached conversation must be token-for-token the recomputed one"


def test_continuous_batching_needs_fewer_steps_than_static(claims):
    """Static waits for each batch's longest request: at least the sum of the batches' longest
    lengths in steps. Continuous refills seats, so the same tokens take fewer, fuller steps."""
    _, res = claims
    b, batch = res["batching"], res["sizes"]["batch"]
    lengths = b["lengths"]
    static, cont = b["static"], b["continuous"]
    assert static["output_tokens"] == cont["output_tokens"] == sum(lengths)
    longest = sum(max(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    assert static["steps"] >= longest
    assert cont["steps"] < static["steps"]
    assert cont["slot_use"] > static["slot_use"]
    assert static["same_counts"] and cont["same_counts"]


def test_paged_pool_uses_more_of_what_it_sets_aside(claims):
    _, res = claims
    util, fit = res["memory"]["util"], res["memory"]["fit"]
    assert 0 < util["reserve_model"] < util["reserve_request"] < util["paged"] <= 1
    assert fit["paged"] > fit["reserve_request"] > fit["reserve_model"]


def test_quantization_and_concurrency_rows(claims):
    _, res = claims
    (row,) = res["quantization"]
    assert row["size_mib"] > 0 and row["rss_mib"] > 0 and row["ppl"] > 1
    assert row["seed"] is None  # a tiny random model has no seed figure
    levels = res["concurrency"]
    assert [lv["clients"] for lv in levels] == list(res["sizes"]["levels"])
    for lv, n in zip(levels, res["sizes"]["level_requests"]):
        assert lv["requests"] == n and lv["output_tokens"] > 0 and lv["ttft_p50"] >= 0
