"""One sequence being generated: the unit the scheduler batches. A request with n > 1 choices
becomes n sequences that share their prompt's blocks after the prompt is computed. The
scheduler is the only one that changes a sequence; everything else reads it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edgert.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n choices
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: float
    deadline: float | None = None  # monotonic time after which it finishes with "timeout"
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens of all_ids whose K/V are in the pool
    num_cached: int = 0  # prompt tokens served by the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0
    # Prompt-lookup backoff: decode steps left without guessing, and guesses missed in a row
    # (each miss doubles the pause, so text that does not repeat stops paying for wide calls).
    spec_pause: int = 0
    spec_misses: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the graph; exactly 1 means a decode step."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed == 1

    @property
    def seats(self) -> int:
        """Places in the running batch this sequence stands for: a first choice whose prompt is
        not computed yet also holds the places of the n - 1 choices it will fork into."""
        return self.params.n if self.index == 0 and not self.output_ids else 1

    @property
    def rank(self) -> tuple[int, float, int]:
        """Scheduling order: priority (lower first), then arrival, then id."""
        return self.params.priority, self.arrival, self.seq_id

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
