"""The paged-KV calling convention, implemented once: a planned graph call -> the graph's inputs,
padded to the call's shape, plus where every new token's K/V goes in the pool and which logits
rows belong to whom. Everything that feeds a bundle's graph (the engine's runner, `edgert eval`,
the exporter's calibration, the tests' reference runner) builds its inputs here.

Padding rows have query_len 0 and a table of null blocks; padding tokens get slot -1. Their
outputs are finite garbage (the graph masks on the key axis) and are never read or written
back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgert.core.plan import Call
from edgert.core.shapes import Shape


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [S, T] int32
    positions: np.ndarray  # [S, T] int32
    query_lens: np.ndarray  # [S] int32
    context_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, B] int32: each row's past AND this call's slots, 0-padded
    logits_indices: np.ndarray  # [N] int32: flat S*T positions that go through the LM head

    @property
    def shape(self) -> Shape:
        return (*self.input_ids.shape, self.block_tables.shape[1])


@dataclass
class StepLayout:
    inputs: StepInputs
    slot_mapping: np.ndarray  # [S, T] int64: each new token's flat pool slot, -1 for padding
    logit_rows: list[np.ndarray]  # per row of the call: its rows of the `logits` output


def build_step(call: Call, block_size: int) -> StepLayout:
    rows = call.rows
    return layout(shape=call.shape, tokens=[r.tokens for r in rows],
                  starts=[r.start for r in rows], tables=[r.table for r in rows],
                  logits=[r.logits for r in rows], block_size=block_size)


def layout(shape: Shape, tokens: Sequence[Sequence[int]], starts: Sequence[int],
           tables: Sequence[Sequence[int]], logits: Sequence[Sequence[int]],
           block_size: int) -> StepLayout:
    """tokens[s]: row s's new tokens; starts[s]: how many it has in the pool; tables[s]: its
    block table (covering starts[s] + len(tokens[s]) slots); logits[s]: which of its new
    tokens (row-local) need logits. `shape` = (S, T, B) pads every dimension."""
    S, T, B = shape
    n = len(tokens)
    if n > S or any(len(t) > T for t in tokens):
        raise ValueError(f"{n} rows of up to {max(map(len, tokens))} tokens do not fit {shape}")
    ids = np.zeros((S, T), np.int32)
    table = np.zeros((S, B), np.int32)
    qlen = np.zeros(S, np.int32)
    ctx = np.zeros(S, np.int32)
    for s in range(n):
        ids[s, : len(tokens[s])] = tokens[s]
        own = tables[s][:B]
        table[s, : len(own)] = own
        if -(-(starts[s] + T) // block_size) > B:
            raise ValueError(f"row {s}: past {starts[s]} + {T} slots exceed {B} blocks")
    qlen[:n] = [len(t) for t in tokens]
    ctx[:n] = starts
    offs = np.arange(T, dtype=np.int64)
    pos = ctx[:, None].astype(np.int64) + offs[None, :]  # [S, T]
    valid = offs[None, :] < qlen[:, None]
    blocks = np.take_along_axis(table, np.minimum(pos // block_size, B - 1), axis=1)
    slots = np.where(valid, blocks.astype(np.int64) * block_size + pos % block_size, -1)
    index, rows, at = [], [], 0
    for s in range(n):
        p = np.asarray(logits[s], np.int64)
        index.append(s * T + p)
        rows.append(np.arange(at, at + len(p)))
        at += len(p)
    inputs = StepInputs(
        input_ids=ids, positions=np.where(valid, pos, 0).astype(np.int32), query_lens=qlen,
        context_lens=ctx, block_tables=table,
        logits_indices=(np.concatenate(index) if index else np.zeros(0, np.int64)).astype(
            np.int32))
    return StepLayout(inputs, slots, rows)


def fresh_prefill(windows: np.ndarray, block_size: int,
                  logits_indices: np.ndarray | None = None) -> StepInputs:
    """Whole windows [S, T] from an empty past through a pool holding only the null block
    (nothing is read from it; the new K/V are not kept): how `edgert eval` and calibration
    score text. Default logits: every position."""
    s, t = windows.shape
    shape = (s, t, -(-t // block_size))
    every = [tuple(range(t))] * s if logits_indices is None else [()] * s
    inputs = layout(shape, [list(w) for w in windows], [0] * s, [()] * s, every,
                    block_size).inputs
    if logits_indices is not None:
        inputs.logits_indices = np.asarray(logits_indices, np.int32)
    return inputs


def at_least_one_logit(x: StepInputs) -> tuple[StepInputs, int]:
    """(inputs asking for at least one logits row, how many rows are real). A middle prefill
    chunk needs no logits; a TensorRT profile cannot start at N = 0, so such a call asks for
    row 0 and the caller drops it."""
    n = int(x.logits_indices.size)
    if n:
        return x, n
    return StepInputs(x.input_ids, x.positions, x.query_lens, x.context_lens, x.block_tables,
                      np.zeros(1, np.int32)), 0


def dummy_inputs(shape: Shape) -> StepInputs:
    """Inputs of a given shape that read only the null block: for warm-up."""
    s, t, b = shape
    z = np.zeros
    return StepInputs(z((s, t), np.int32), z((s, t), np.int32), np.full(s, t, np.int32),
                      z(s, np.int32), z((s, b), np.int32), np.arange(s, dtype=np.int32) * t)
