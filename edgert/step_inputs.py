"""Turn a scheduled batch into the graph's inputs, padded to a small set of bucketed shapes.

Bucketing keeps the number of distinct (S, T, B) shapes logarithmic, so ONNX Runtime's arena
stops growing after warm-up and memory stays flat over months of varied requests. Padded rows
have query_len 0 and a table of null blocks; their outputs are never read or written back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [S, T] int32
    positions: np.ndarray  # [S, T] int32
    query_lens: np.ndarray  # [S] int32
    context_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, B] int32, padded with the null block 0
    logits_indices: np.ndarray  # [N] int32

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.input_ids.shape, self.block_tables.shape[1])


def bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3*2^k) that is >= n: at most
    1.5x padding, and only two shapes per octave."""
    if n <= 2:
        return max(n, 1)
    p = 1 << (n - 1).bit_length()  # power of two >= n
    three = 3 * p // 4
    return three if three >= n else p


@dataclass
class StepLayout:
    """Where things landed: the flat pool slot of every new token (-1: padding) and, per
    sequence, the rows of `logits` that belong to it."""

    inputs: StepInputs
    slot_mapping: np.ndarray  # [S, T] int64
    logit_rows: list[np.ndarray]  # per real sequence: row numbers into the logits output


def build_step(tokens: list[list[int]], starts: list[int], tables: list[list[int]],
               logits_positions: list[np.ndarray], block_size: int, pad: bool = True
               ) -> StepLayout:
    """tokens[s]: the new tokens of sequence s; starts[s]: how many tokens it has in the pool
    (its context length); tables[s]: its block table, covering start + len(tokens) tokens;
    logits_positions[s]: which of its new tokens (chunk-local) need logits."""
    n = len(tokens)
    t_max = max(len(t) for t in tokens)
    S = bucket(n) if pad else n
    T = bucket(t_max) if pad else t_max
    # The table covers the past AND this step's (padded) tokens: the graph places the new K/V
    # at their own positions among the gathered keys.
    spans = [-(-(start + T) // block_size) for start in starts]
    B = bucket(max(spans)) if pad else max(spans)
    ids = np.zeros((S, T), np.int32)
    qlen = np.zeros(S, np.int32)
    ctx = np.zeros(S, np.int32)
    full_w = max(len(tb) for tb in tables)
    full = np.zeros((S, max(full_w, 1)), np.int64)
    for s in range(n):
        ids[s, : len(tokens[s])] = tokens[s]
        full[s, : len(tables[s])] = tables[s]
    qlen[:n] = [len(t) for t in tokens]
    ctx[:n] = starts
    offs = np.arange(T, dtype=np.int64)
    pos = ctx[:, None].astype(np.int64) + offs[None, :]  # [S, T]
    valid = offs[None, :] < qlen[:, None]
    block_col = np.minimum(pos // block_size, full.shape[1] - 1)
    blocks = np.take_along_axis(full, block_col, axis=1)
    slots = np.where(valid, blocks * block_size + pos % block_size, -1)
    tables_in = full[:, :B].astype(np.int32) if full.shape[1] >= B else np.pad(
        full.astype(np.int32), ((0, 0), (0, B - full.shape[1])))
    rows, index, start = [], [], 0
    for s in range(n):
        p = np.asarray(logits_positions[s], np.int64)
        index.append(s * T + p)
        rows.append(np.arange(start, start + len(p)))
        start += len(p)
    inputs = StepInputs(
        input_ids=ids, positions=np.where(valid, pos, 0).astype(np.int32), query_lens=qlen,
        context_lens=ctx, block_tables=tables_in,
        logits_indices=(np.concatenate(index) if index else np.zeros(0, np.int64)).astype(
            np.int32))
    return StepLayout(inputs, slots, rows)
