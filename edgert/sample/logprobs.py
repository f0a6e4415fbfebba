"""Log-probabilities for the API: of a chosen token, of the most likely alternatives, of prompt
tokens (echo). "Raw" (vLLM's default): log_softmax of the model's logits before penalties,
temperature and filtering, so they describe the model, not the sampling knobs. The reference
order of tokens (value descending, ties by lower id) is defined here once, and the sampler's
candidate prefilter uses the same one."""

from __future__ import annotations

import numpy as np

from edgert.outputs import TokenLogprob

_LOW32 = np.uint64(0xFFFFFFFF)


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
    part = np.argpartition(x, v - c, axis=1)[:, v - c :]
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
