"""Log-probabilities for the API: of a chosen token, of the most likely alternatives, of prompt
tokens (echo). "Raw" (vLLM's default): log_softmax of the model's logits before penalties,
temperature and filtering, so they describe the model, not the sampling knobs. The reference
order of tokens (value descending, ties by lower id) is defined here once, and the sampler's
candidate prefilter uses the same one."""

from __future__ import annotations

import numpy as np

from edgert.outputs import TokenLogprob

_LOW32 = np.uint64(0xFFFFFFFF)
_SAMPLE = 2048  # entries per row the candidate threshold is estimated from


def _desc_keys(vals: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is (value descending, id ascending).

    Sorting one uint64 array is far cheaper than a stable argsort or a lexsort, and it pins the
    order of tied values, which keeps results independent of the partition algorithm."""
    bits = (np.asarray(vals, dtype=np.float32) + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0
    # Positive floats: flip the magnitude bits (bigger -> smaller key); negatives keep their bits,
    # which already grow with the magnitude and sort after every positive thanks to the sign bit.
    flip = np.invert(bits >> 31)
    flip &= np.int32(0x7FFFFFFF)
    flip ^= bits
    keys = flip.view(np.uint32).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= ids.view(np.uint64) if ids.dtype == np.int64 else ids.astype(np.uint64)
    return keys


def _superset(x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, values) [n, W] holding every row's c largest values, padded with -inf, or None.

    argpartition over a 49k row costs ~0.4 ms, and the sampler asks for a few hundred candidates
    from 16 rows each step. A threshold from a strided sample of ~2k entries per row keeps ~2c of
    each row (twice the count the sample predicts, plus a margin) in one vectorised compare, and
    the exact partition then runs over those. Correctness does not rest on the sample: a row
    keeping c or more entries at or above its threshold keeps its c largest; if some row keeps
    fewer (or a row is mostly ties, as in a masked row), the caller partitions the whole rows."""
    n, v = x.shape
    stride = v // _SAMPLE
    if stride < 2 or 8 * c > v or n == 0:
        return None
    sub = x[:, ::stride]
    m = sub.shape[1]
    j = min(m, 2 * -(-c // stride) + 8)
    tau = np.partition(sub, m - j, axis=1)[:, m - j]
    r, col = np.divmod(np.flatnonzero(x >= tau[:, None]), v)  # 1-D: far cheaper than 2-D nonzero
    counts = np.bincount(r, minlength=n)
    if counts.min() < c or counts.max() > v // 2:
        return None
    width = int(counts.max())
    pos = np.arange(r.size) - (np.cumsum(counts) - counts)[r]
    ids = np.zeros((n, width), dtype=np.int64)
    vals = np.full((n, width), -np.inf, dtype=x.dtype)
    ids[r, pos] = col
    vals[r, pos] = x[r, col]
    return ids, vals


def top_sorted(x: np.ndarray, c: int) -> np.ndarray:
    """Ids of the first `c` tokens of each row in reference order (value desc, id asc), exactly.

    argpartition picks an arbitrary subset of the values tied at the boundary; rows where that
    happens are repaired with one O(V) numpy pass each (common only for fp16-quantised logits)."""
    n, v = x.shape
    if c >= v:
        keys = _desc_keys(x, np.arange(v, dtype=np.int64))  # ids broadcast in the final OR
        keys.sort(axis=1)
        keys &= _LOW32
        return keys.view(np.int64)
    pre = _superset(x, c)
    if pre is None:
        part = np.argpartition(x, v - c, axis=1)[:, v - c :]
    else:
        ids, vals = pre
        w = ids.shape[1]
        part = np.take_along_axis(ids, np.argpartition(vals, w - c, axis=1)[:, w - c :], axis=1)
    bound = np.take_along_axis(x, part, axis=1).min(axis=1)
    n_ge = np.count_nonzero(x >= bound[:, None], axis=1)
    for r in np.flatnonzero(n_ge > c):
        above = np.flatnonzero(x[r] > bound[r])
        tied = np.flatnonzero(x[r] == bound[r])[: c - above.size]
        part[r] = np.concatenate([above, tied])
    keys = _desc_keys(np.take_along_axis(x, part, axis=1), part)
    keys.sort(axis=1)
    keys &= _LOW32
    return keys.view(np.int64)


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """float64 log-normaliser per row: logprob(i) = x_i - lse, so a caller that needs k values
    never materialises the whole log_softmax row."""
    m = x.max(axis=1)
    return m + np.log(np.sum(np.exp(x - m[:, None]), axis=1, dtype=np.float64))


def logprobs_of(logits: np.ndarray, token_ids: np.ndarray, k: int) -> list[TokenLogprob]:
    """Raw logprob of `token_ids[i]` under row i of `logits`, plus the k most likely tokens.

    For prompt logprobs (echo): row i is the model's prediction of prompt token i + 1."""
    x = np.asarray(logits, dtype=np.float32)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != ids.size:
        raise ValueError(f"logits {x.shape} do not match {ids.size} token ids")
    if ids.size == 0:
        return []
    lse = logsumexp_rows(x)
    chosen = (x[np.arange(ids.size), ids] - lse).tolist()
    best = top_sorted(x, k) if k > 0 else np.zeros((ids.size, 0), dtype=np.int64)
    return [
        TokenLogprob(int(t), c, dict(zip(b.tolist(), (x[i, b] - lse[i]).tolist(), strict=True)))
        for i, (t, c, b) in enumerate(zip(ids, chosen, best, strict=True))
    ]
