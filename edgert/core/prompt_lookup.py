"""Draft tokens for speculative decoding without a draft model: prompt lookup (n-gram matching).

When a sequence's last n tokens occurred earlier in its own prompt or output, the tokens that
followed them then are a cheap guess of what follows now: a model quoting a document, editing
code or filling a template repeats long runs. The guess costs no model: the graph checks up to
k guesses in the same call that decodes the real token (the paged graph already takes T query
tokens per sequence), and the engine keeps the longest prefix the model itself would have
produced (engine/llm_engine.py). A wrong guess costs only the wider call.

The most recent earlier occurrence of the longest matching n-gram (n from `max_n` down to
`min_n`) wins: recent context predicts better than distant context, and a longer match is
stronger evidence. One numpy comparison per n over the whole context; no Python loop per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["propose"]


def propose(token_ids: Sequence[int] | np.ndarray, k: int, min_n: int = 2,
            max_n: int = 4) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the sequence's trailing
    n-gram, for the largest n in [min_n, max_n] that has one; [] when none matches."""
    ids = np.asarray(token_ids, dtype=np.int64)
    size = ids.size
    if k < 1 or size < min_n + 1:
        return []
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        # windows starting at 0 .. size - n - 1: each ends before the trailing n-gram itself
        # and is followed by at least one token
        windows = sliding_window_view(ids[: size - 1], n)
        hits = np.flatnonzero((windows == ids[size - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start: start + k].tolist()
    return []
