"""What the engine streams back for a request: one RequestOutput per step per choice."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # alternative token id -> logprob


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None  # when its first prefill chunk ran
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the prefix cache
    completion_tokens: int = 0

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if (self.finished_time is None or self.first_token_time is None
                or self.completion_tokens < 2):
            return None
        return (self.finished_time - self.first_token_time) / (self.completion_tokens - 1)


@dataclass
class RequestOutput:
    request_id: str
    index: int  # which of the n choices
    text: str  # the new text since the last output (a delta), stop strings held back
    token_ids: list[int]  # the new token ids since the last output
    logprobs: list[TokenLogprob] | None = None  # for token_ids, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only, when asked
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "timeout", "error"
    error: str | None = None
    metrics: RequestMetrics | None = None  # set on the final output
