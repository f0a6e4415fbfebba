"""The sampler against plain references (full sorts, Python loops) and against the distributions it
claims to draw from. The references restate the module docstring's exact algorithm in the most
direct way, so any disagreement is a bug in the fast path (candidate stages, tie repair, widening).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.sample import logprobs, sampler
from edgert.sample.logprobs import logprobs_of, top_sorted
from edgert.sample.sampler import SamplerRow, apply_penalties, sample, uniforms
from edgert.sampling_params import SamplingParams

V_BIG = 49152


def row(seed: int = 0, step: int = 0, prompt: list[int] | None = None,
        output: list[int] | None = None, **kw: object) -> SamplerRow:
    return SamplerRow(SamplingParams(**kw), seed=seed, step=step,  # type: ignore[arg-type]
                      prompt_token_ids=np.array(prompt or [], dtype=np.int32),
                      output_token_ids=np.array(output or [], dtype=np.int32))


def llm_like(rng: np.random.Generator, n: int, v: int, zipf: float = 1.3) -> np.ndarray:
    """Zipf-shaped logits over a random permutation: a long tail like a language model's."""
    ranks = np.stack([rng.permutation(v) + 1 for _ in range(n)])
    return (-zipf * np.log(ranks) + 0.3 * rng.standard_normal((n, v))).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# plain references


def ref_kept(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(kept ids in reference order, their float64 weights), by a full stable sort and a loop."""
    v = logits.size
    t = logits.astype(np.float32) / np.float32(p.temperature)
    t = t - t.max()
    order = np.argsort(-t, kind="stable")  # value descending, ties: lower id first
    w = np.exp(t[order]).astype(np.float64)
    n_k = v
    if 0 < p.top_k < v:
        kth = t[order][p.top_k - 1]
        n_k = int(np.sum(t >= kth))
        z = float(np.cumsum(w)[n_k - 1])
    else:
        z = float(np.sum(np.exp(t), dtype=np.float64))
    kept = []
    before = 0.0
    for j in range(n_k):
        if p.top_p < 1.0 and not before < p.top_p * z:
            break
        if p.min_p > 0.0 and not w[j] >= p.min_p:
            break
        kept.append(j)
        before += w[j]
    return order[kept], w[kept]


def ref_draw(logits: np.ndarray, p: SamplingParams, u: float) -> int:
    ids, w = ref_kept(logits, p)
    cs = np.cumsum(w)
    total = cs[-1]
    j = min(int(np.sum(cs <= u * total)), int(np.argmax(cs >= total)))
    return int(ids[j])


def ref_penalties(logits: np.ndarray, r: SamplerRow) -> np.ndarray:
    out = logits.astype(np.float32).copy()
    p = r.params
    if p.repetition_penalty != 1.0:
        for tok in set(r.prompt_token_ids.tolist()) | set(r.output_token_ids.tolist()):
            x = out[tok]
            out[tok] = x / np.float32(p.repetition_penalty) if x > 0 else x * np.float32(
                p.repetition_penalty)
    counts: dict[int, int] = {}
    for tok in r.output_token_ids.tolist():
        counts[tok] = counts.get(tok, 0) + 1
    for tok, c in counts.items():
        out[tok] -= p.presence_penalty + p.frequency_penalty * c
    return out


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chi2_critical(df: int, z: float = 4.265) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 4.265: p ~ 1e-5), to avoid scipy."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_frequencies(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Chi-square goodness of fit; cells with expectation < 5 are pooled into one."""
    n = tokens.size
    counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
    exp = probs * n
    big = exp >= 5
    obs_c = np.append(counts[big], counts[~big & (probs > 0)].sum())
    exp_c = np.append(exp[big], exp[~big & (probs > 0)].sum())
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    chi2 = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    df = max(obs_c.size - 1, 1)
    assert chi2 < chi2_critical(df), f"chi2 {chi2:.1f} with {df} dof"


# ------------------------------------------------------------------------------------------------
# greedy


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1000)).astype(np.float32)
    x[3, [10, 500, 900]] = 50.0  # a three-way tie for the maximum
    res = sample(x, [row(temperature=0.0) for _ in range(8)])
    assert res.token_ids.dtype == np.int32
    np.testing.assert_array_equal(res.token_ids, x.argmax(axis=1))
    assert res.token_ids[3] == 10
    assert res.logprobs is None and res.top_logprobs is None


@given(seed=st.integers(0, 2**63 - 1), temp=st.floats(0.05, 100.0), step=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_top_k_1_is_greedy_for_any_temperature(seed: int, temp: float, step: int) -> None:
    x = np.random.default_rng(seed % 2**32).standard_normal((1, 3000)).astype(np.float32)
    res = sample(x, [row(seed=seed, step=step, temperature=temp, top_k=1)])
    assert res.token_ids[0] == x.argmax()


def test_tiny_temperature_is_greedy_not_nan() -> None:
    x = np.array([[30.0, 29.0, -5.0]], dtype=np.float32)
    assert sample(x, [row(temperature=1e-9)]).token_ids[0] == 0


# ------------------------------------------------------------------------------------------------
# randomness: keyed by (seed, step) only


def test_uniforms_are_uniform_and_keyed() -> None:
    u = uniforms(np.arange(200_000, dtype=np.uint64), np.zeros(200_000, dtype=np.uint64))
    assert u.min() >= 0.0 and u.max() < 1.0
    hist = np.histogram(u, bins=100, range=(0, 1))[0]
    chi2 = float(((hist - 2000.0) ** 2 / 2000.0).sum())
    assert chi2 < chi2_critical(99)
    # consecutive steps of one seed are not correlated
    us = uniforms(np.full(100_000, 7, dtype=np.uint64), np.arange(100_000, dtype=np.uint64))
    assert abs(np.corrcoef(us[:-1], us[1:])[0, 1]) < 0.02
    a = uniforms(np.array([5, 5], dtype=np.uint64), np.array([3, 4], dtype=np.uint64))
    b = uniforms(np.array([5], dtype=np.uint64), np.array([3], dtype=np.uint64))
    assert a[0] == b[0] and a[0] != a[1]


def mixed_rows(rng: np.random.Generator, n: int, v: int) -> list[SamplerRow]:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=40),
        dict(temperature=0.9, min_p=0.05),
        dict(temperature=1.0, top_k=300, top_p=0.8, min_p=0.01),
        dict(temperature=2.0, top_p=0.99),  # widens to the full vocabulary
        dict(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.4,
             frequency_penalty=0.3, logprobs=3),
    ]
    rows = []
    for i in range(n):
        kw = kinds[i % len(kinds)]
        rows.append(row(seed=int(rng.integers(2**63)), step=int(rng.integers(1000)),
                        prompt=rng.integers(0, v, 30).tolist(),
                        output=rng.integers(0, v, 12).tolist(), **kw))  # type: ignore[arg-type]
    return rows


def test_same_seed_step_same_token_alone_or_in_any_batch_position() -> None:
    rng = np.random.default_rng(1)
    v = 12_000
    x = llm_like(rng, 16, v, zipf=1.0)
    rows = mixed_rows(rng, 16, v)
    batch = sample(x, rows)
    for i in range(16):
        alone = sample(x[i : i + 1], [rows[i]])
        assert alone.token_ids[0] == batch.token_ids[i], i
    for _ in range(3):
        perm = rng.permutation(16)
        shuffled = sample(x[perm], [rows[i] for i in perm])
        np.testing.assert_array_equal(shuffled.token_ids, batch.token_ids[perm])
    # the logprobs row too
    assert batch.logprobs is not None and batch.top_logprobs is not None
    alone = sample(x[7:8], [rows[7]])
    assert alone.logprobs is not None and alone.top_logprobs is not None
    assert alone.logprobs[0] == batch.logprobs[7]
    assert alone.top_logprobs[0] == batch.top_logprobs[7]


def test_same_seed_different_step_differs() -> None:
    x = np.zeros((1, 1000), dtype=np.float32)
    toks = {int(sample(x, [row(seed=3, step=s)]).token_ids[0]) for s in range(50)}
    assert len(toks) > 40


# ------------------------------------------------------------------------------------------------
# distributions


def test_temperature_distribution_matches_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5, 0.2, -8.0], dtype=np.float32)
    n = 20_000
    for temp in (0.5, 1.0, 2.0):
        rows = [row(seed=s, step=0, temperature=temp) for s in range(n)]
        toks = sample(np.tile(logits, (n, 1)), rows).token_ids
        assert_frequencies(toks, np.exp(log_softmax64(logits / temp)))


def test_pure_sampling_over_many_blocks() -> None:
    """The two-level CDF of unfiltered rows (blocks of 512) against softmax on a 5000-token row."""
    rng = np.random.default_rng(2)
    logits = llm_like(rng, 1, 5000, zipf=1.6)[0]
    n = 20_000
    toks = sample(np.tile(logits, (n, 1)), [row(seed=s, step=9) for s in range(n)]).token_ids
    assert_frequencies(toks, np.exp(log_softmax64(logits)))


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.8, top_p=0.7),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.5, top_k=8, top_p=0.9, min_p=0.05),
])
def test_filtered_distribution_matches_renormalised_reference(kw: dict[str, float]) -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5, 0.2, -8.0, 1.9, 0.7],
                      dtype=np.float32)
    p = SamplingParams(**kw)  # type: ignore[arg-type]
    ids, w = ref_kept(logits, p)
    probs = np.zeros(logits.size)
    probs[ids] = w / w.sum()
    n = 20_000
    rows = [row(seed=s, step=1, **kw) for s in range(n)]  # type: ignore[arg-type]
    toks = sample(np.tile(logits, (n, 1)), rows).token_ids
    assert_frequencies(toks, probs)


# ------------------------------------------------------------------------------------------------
# exactness of the fast path against the full-sort reference


def check_exact(x: np.ndarray, kw: dict[str, float], seeds: range, step: int = 0) -> None:
    p = SamplingParams(**kw)  # type: ignore[arg-type]
    rows = [SamplerRow(p, seed=s, step=step) for s in seeds]
    toks = sample(np.tile(x, (len(rows), 1)), rows).token_ids
    u = uniforms(np.array(list(seeds), dtype=np.uint64), np.full(len(rows), step, np.uint64))
    kept = set(ref_kept(x, p)[0].tolist())
    # Unfiltered rows draw in id order over a two-level CDF (no sort at all): only their
    # distribution is specified, and test_pure_sampling_over_many_blocks checks it.
    pure = not (0 < p.top_k < x.size or p.top_p < 1.0 or p.min_p > 0.0)
    for tok, uu in zip(toks.tolist(), u.tolist(), strict=True):
        assert tok in kept
        assert pure or tok == ref_draw(x, p, uu)


@given(seed=st.integers(0, 2**32 - 1),
       temp=st.sampled_from([0.3, 0.7, 1.0, 1.5, 3.0]),
       top_k=st.sampled_from([0, 0, 1, 5, 50, 255, 256, 257, 1000, 5000]),
       top_p=st.sampled_from([1.0, 1.0, 0.5, 0.9, 0.95, 0.99]),
       min_p=st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.5]),
       zipf=st.sampled_from([0.6, 1.0, 1.4, 2.5]))
@settings(max_examples=60, deadline=None)
def test_fast_path_equals_full_sort_reference(seed: int, temp: float, top_k: int, top_p: float,
                                              min_p: float, zipf: float) -> None:
    x = llm_like(np.random.default_rng(seed), 1, 8192, zipf)[0]
    check_exact(x, dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p),
                range(seed % 1000, seed % 1000 + 8))


def test_flat_distribution_widening_is_exact() -> None:
    """A near-flat 49k row with top_p = 0.99: the nucleus is far wider than every candidate stage,
    so the row must widen to the full vocabulary and still match the full sort."""
    rng = np.random.default_rng(3)
    x = (0.05 * rng.standard_normal(V_BIG)).astype(np.float32)
    p = SamplingParams(top_p=0.99)
    ids, _ = ref_kept(x, p)
    assert ids.size > 4 * max(sampler.CANDIDATE_STAGES)
    check_exact(x, dict(top_p=0.99), range(40))
    # min_p that keeps nearly everything widens too
    check_exact(x, dict(min_p=0.5), range(40, 60))


def test_middle_stage_is_exact() -> None:
    """A nucleus between the first and the second stage."""
    rng = np.random.default_rng(4)
    x = llm_like(rng, 1, V_BIG, zipf=0.9)[0]
    p = SamplingParams(top_p=0.6)
    n = ref_kept(x, p)[0].size
    assert sampler.CANDIDATE_STAGES[0] < n < sampler.CANDIDATE_STAGES[1]
    check_exact(x, dict(top_p=0.6), range(30))


def test_ties_at_the_candidate_boundary_are_exact() -> None:
    """fp16-like logits have many ties: the argpartition tie repair and top_k's keep-ties rule."""
    rng = np.random.default_rng(5)
    x = np.round(llm_like(rng, 1, 20_000, zipf=0.8)[0] * 4) / 4  # coarse grid: huge tie groups
    x = x.astype(np.float32)
    for kw in (dict(top_k=256), dict(top_k=100, temperature=0.5), dict(top_p=0.3),
               dict(min_p=0.3), dict(top_p=0.05, temperature=2.0)):
        check_exact(x, kw, range(20))  # type: ignore[arg-type]
    # top_k keeps every token tied with the k-th
    p = SamplingParams(top_k=256)
    kept = ref_kept(x, p)[0]
    assert kept.size > 256


@pytest.mark.parametrize("v", [1000, 8192, 49152])
def test_top_sorted_is_the_reference_order_prefix_for_every_kind_of_row(v: int) -> None:
    """top_sorted's thresholded prefilter against np.lexsort, in one batch mixing smooth rows,
    huge tie groups, mostly masked rows, and rows built to fool the strided sample both ways
    (the sampled entries far above the rest, or the top entries all off the sample's grid)."""
    rng = np.random.default_rng(v)
    rows = [llm_like(rng, 1, v, zipf=z)[0] for z in (0.6, 1.4)]
    rows.append(np.round(rows[0] * 2) / 2)  # coarse grid: ties at every boundary
    masked = np.full(v, -np.inf, dtype=np.float32)
    masked[rng.choice(v, 40, replace=False)] = rng.standard_normal(40)
    rows.append(masked)
    stride = max(1, v // logprobs._SAMPLE)  # the grid top_sorted samples on
    high_on_grid = rng.standard_normal(v).astype(np.float32)
    high_on_grid[::stride] += 50.0
    rows.append(high_on_grid)
    top_off_grid = rng.standard_normal(v).astype(np.float32)
    off = np.flatnonzero(np.arange(v) % stride != 0) if stride > 1 else np.arange(v)
    top_off_grid[rng.choice(off, min(300, off.size), replace=False)] += 50.0
    rows.append(top_off_grid)
    x = np.stack(rows).astype(np.float32)
    ref = np.stack([np.lexsort((np.arange(v), -r)) for r in x])
    for c in (1, 5, 40, 257, 1000, 4097):
        if c >= v:
            continue
        np.testing.assert_array_equal(top_sorted(x, c), ref[:, :c], err_msg=f"c={c}")
        for i in range(len(rows)):  # alone equals in the batch
            np.testing.assert_array_equal(top_sorted(x[i:i + 1], c)[0], ref[i, :c])


def test_top_p_never_draws_outside_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    n = 5000
    # nucleus of 0.8: {0, 1} (mass before token 2 is 0.8, not < 0.8)... up to float rounding,
    # which the reference decides; tokens outside it must never appear
    p = SamplingParams(top_p=0.75)
    kept = set(ref_kept(logits, p)[0].tolist())
    assert kept == {0, 1}
    toks = sample(np.tile(logits, (n, 1)), [SamplerRow(p, s, 0) for s in range(n)]).token_ids
    assert set(toks.tolist()) == kept


def test_masked_tokens_are_never_drawn() -> None:
    """-inf logits (a masked or padded vocabulary) have weight 0 under every kind of row."""
    rng = np.random.default_rng(9)
    v = 6000
    x = np.full((1, v), -np.inf, dtype=np.float32)
    allowed = rng.choice(v, 700, replace=False)
    x[0, allowed] = rng.standard_normal(700).astype(np.float32)
    for kw in (dict(), dict(top_p=0.999), dict(top_k=1000), dict(min_p=1e-9), dict(temperature=0),
               dict(top_k=1000, top_p=0.999, temperature=5.0)):
        n = 400
        rows = [row(seed=s, step=2, **kw) for s in range(n)]  # type: ignore[arg-type]
        toks = sample(np.tile(x, (n, 1)), rows).token_ids
        assert np.isin(toks, allowed).all(), kw


# ------------------------------------------------------------------------------------------------
# penalties and logprobs


@given(seed=st.integers(0, 2**32 - 1), rep=st.sampled_from([1.0, 0.7, 1.3, 2.0]),
       pres=st.sampled_from([0.0, -0.5, 0.8]), freq=st.sampled_from([0.0, 0.3, -1.0]))
@settings(max_examples=40, deadline=None)
def test_penalties_match_plain_reference(seed: int, rep: float, pres: float, freq: float) -> None:
    rng = np.random.default_rng(seed)
    v = 500
    x = (3 * rng.standard_normal((4, v))).astype(np.float32)
    rows = [row(prompt=rng.integers(0, v, 40).tolist(), output=rng.integers(0, 60, 25).tolist(),
                repetition_penalty=rep if i % 2 == 0 else 1.0, presence_penalty=pres,
                frequency_penalty=freq if i < 3 else 0.0, temperature=0.0)
            for i in range(4)]
    x0 = x.copy()
    got = apply_penalties(x, rows)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], ref_penalties(x0[i], r), rtol=1e-6, atol=1e-6)
    # greedy follows the penalised logits
    np.testing.assert_array_equal(sample(x, rows).token_ids, got.argmax(axis=1))
    # the caller's array is untouched (by the penalties and by the sampler), and is returned
    # as is only when no row has a penalty
    np.testing.assert_array_equal(x, x0)
    penalised = rep != 1.0 or pres != 0.0 or freq != 0.0
    assert (got is not x and not np.shares_memory(got, x)) if penalised else got is x


def test_repetition_penalty_signs() -> None:
    x = np.array([[2.0, -2.0, 1.0, 0.5]], dtype=np.float32)
    got = apply_penalties(x, [row(prompt=[0, 1], output=[0], repetition_penalty=2.0)])
    np.testing.assert_allclose(got[0], [1.0, -4.0, 1.0, 0.5])
    got = apply_penalties(x, [row(output=[0, 0, 0, 3], presence_penalty=0.5,
                                  frequency_penalty=0.25)])
    np.testing.assert_allclose(got[0], [2.0 - 0.5 - 0.75, -2.0, 1.0, 0.5 - 0.5 - 0.25])


def test_logprobs_are_raw_log_softmax() -> None:
    rng = np.random.default_rng(6)
    x = (2 * rng.standard_normal((5, 3000))).astype(np.float32)
    rows = [row(seed=i, temperature=0.7 if i % 2 else 0.0, logprobs=[0, 3, None, 5, 20][i],
                repetition_penalty=1.5, output=[1, 2, 3]) for i in range(5)]
    res = sample(x, rows)
    ref = log_softmax64(x)
    assert res.logprobs is not None and res.top_logprobs is not None
    for i, r in enumerate(rows):
        k = r.params.logprobs
        if k is None:
            assert np.isnan(res.logprobs[i]) and res.top_logprobs[i] == {}
            continue
        assert res.logprobs[i] == pytest.approx(ref[i, res.token_ids[i]], abs=1e-5)
        top = res.top_logprobs[i]
        assert len(top) == k
        want = np.argsort(-ref[i], kind="stable")[:k]
        assert list(top) == want.tolist()
        for t, lp in top.items():
            assert lp == pytest.approx(ref[i, t], abs=1e-5)


def test_logprobs_of_prompt() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 200)).astype(np.float32)
    ids = rng.integers(0, 200, 6)
    out = logprobs_of(x, ids, 4)
    ref = log_softmax64(x)
    assert [o.token_id for o in out] == ids.tolist()
    for i, o in enumerate(out):
        assert o.logprob == pytest.approx(ref[i, ids[i]], abs=1e-5)
        assert list(o.top) == np.argsort(-ref[i], kind="stable")[:4].tolist()
        assert isinstance(o.logprob, float) and all(isinstance(t, int) for t in o.top)
    assert logprobs_of(x, ids, 0)[0].top == {}
    assert logprobs_of(x[:0], ids[:0], 3) == []
