"""What a request asks of the sampler and the stop logic. Validated once, at the door, so the hot
path never has to re-check a value."""

from __future__ import annotations

from dataclasses import dataclass, field


class ParamError(ValueError):
    """A sampling parameter is out of range; `field` names it (the server answers 400)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output tokens (HF / vLLM semantics)
    presence_penalty: float = 0.0  # over output tokens (OpenAI semantics)
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: the engine draws one, so every request is keyed by (seed, step)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus k alternatives
    prompt_logprobs: int | None = None  # echo: logprobs of the prompt tokens
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    timeout: float | None = None  # seconds from arrival; the scheduler finishes it with "timeout"
    priority: int = 0  # lower runs first (vLLM convention); FCFS among equals
    # Prompt-lookup speculative decoding: up to this many guessed tokens checked per decode
    # step; None: the server's --speculative-tokens; 0: off. Never changes the output.
    speculative_tokens: int | None = None
    # An llguidance grammar (JSON schema, regex, choices or Lark, built by the server) that every
    # output token must follow; the engine checks it against the tokenizer at admission.
    grammar: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ParamError(name, msg)

        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
              "must be >= 1")
        check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 or >= 1")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
              "seed", "must be an integer in [0, 2**63)")
        check(isinstance(self.n, int) and 1 <= self.n <= 16, "n", "must be in [1, 16]")
        check(len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
              "stop", "at most 16 non-empty strings")
        check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
              "prompt_logprobs", "must be in [0, 20]")
        check(self.speculative_tokens is None or (isinstance(self.speculative_tokens, int)
                                                  and 0 <= self.speculative_tokens <= 15),
              "speculative_tokens", "must be in [0, 15]")
        check(self.grammar is None or (isinstance(self.grammar, str) and bool(self.grammar)),
              "grammar", "must be a non-empty grammar")
        check(self.timeout is None or self.timeout > 0, "timeout", "must be > 0 seconds")
