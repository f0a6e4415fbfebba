"""What one engine step asks of the runner: the graph calls to make, each row's tokens and block
table, the copy-on-write block copies to apply first. Plain values, no tensors: the scheduler
fills it from its bookkeeping, the runner turns it into graph inputs, and neither reaches into
the other's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgert.core.sequence import Sequence
from edgert.core.shapes import Shape


@dataclass(frozen=True)
class Row:
    """One sequence's part of a graph call."""

    seq: Sequence  # who it is for (the runner does not look inside)
    start: int  # tokens of the sequence already in the pool (its context length)
    tokens: tuple[int, ...]  # the new tokens fed in this call
    table: tuple[int, ...]  # its block table, covering start + len(tokens) slots
    logits: tuple[int, ...]  # which of the new tokens (call-local) need logits
    # How many trailing `tokens` are speculative guesses (not yet the sequence's): the engine
    # keeps those the model confirms, and the scheduler counts only them as computed.
    draft: int = 0

    @property
    def completes(self) -> bool:
        """Whether this call computes the sequence's last uncomputed token (so it samples)."""
        return self.start + len(self.tokens) - self.draft == self.seq.num_tokens

    @property
    def drafts(self) -> tuple[int, ...]:
        return self.tokens[len(self.tokens) - self.draft:] if self.draft else ()


@dataclass(frozen=True)
class Call:
    rows: tuple[Row, ...]
    shape: Shape  # the padded (S, T, B), always on the ShapeMenu
    # Every row generates: T = 1, a speculative call (one decoding row with its guesses), or
    # one decoding row padded to T = 2 (ShapeMenu.pad_lone_decode); not derivable from the
    # shape, which a one-token prefill chunk shares.
    is_decode: bool


@dataclass
class StepPlan:
    calls: list[Call] = field(default_factory=list)
    cow_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies
    forks: dict[int, list[Sequence]] = field(default_factory=dict)  # parent seq_id -> children
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        return [row for call in self.calls for row in call.rows]

    def __bool__(self) -> bool:
        return bool(self.calls)
