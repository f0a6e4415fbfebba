"""Offline batch generation: `LLM(bundle).generate(prompts, params)` runs the engine until every
request finishes and returns whole completions."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgert.bundle import Bundle
from edgert.config import EngineConfig
from edgert.engine.llm_engine import LLMEngine
from edgert.outputs import RequestMetrics, RequestOutput, TokenLogprob
from edgert.sampling_params import SamplingParams


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids


class LLM:
    """Offline batch generation: `LLM(bundle).generate(prompts, params)`."""

    def __init__(self, bundle: str | Bundle, config: EngineConfig | None = None, **overrides):
        if overrides:
            config = replace(config or EngineConfig(), **overrides)
        self.engine = LLMEngine(bundle, config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids, results = [], {}
        for prompt, p in zip(prompts, plist):
            rid = self.engine.add_request(prompt, p)
            ids.append(rid)
            toks = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            results[rid] = Completion(rid, toks, [Choice(i, "", [], None, [] if p.logprobs
                                                         is not None else None)
                                                  for i in range(p.n)])
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self.accumulate(results[out.request_id], out)
        return [results[r] for r in ids]

    @staticmethod
    def accumulate(c: Completion, out: RequestOutput) -> None:
        ch = c.choices[out.index]
        ch.text += out.text
        ch.token_ids.extend(out.token_ids)
        if out.logprobs is not None and ch.logprobs is not None:
            ch.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            ch.finish_reason = out.finish_reason
        if out.metrics is not None:
            c.metrics = out.metrics
