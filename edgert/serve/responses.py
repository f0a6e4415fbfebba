"""OpenAI-compatible responses built from engine outputs: whole objects, stream chunks, usage and
both logprob formats (completions' and chat's). Nothing here touches the engine or the network."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from edgert.outputs import RequestOutput, TokenLogprob
from edgert.serve.openai_protocol import GenerationRequest
from edgert.serve.tools import tool_calls
from edgert.text.tokenizer import Tokenizer

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens the same way


def _lp(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


class TokenText:
    """Token id -> the text a logprobs entry shows for it (special tokens included)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._text = lru_cache(maxsize=1 << 16)(
            lambda t: tokenizer.decode([t], skip_special_tokens=False))

    def __call__(self, token_id: int) -> str:
        return self._text(token_id)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # a chat stream's first chunk carries the role
    offset: int = 0  # text_offset of the next completion logprob
    calls: list[dict[str, Any]] | None = None  # the reply as tool calls, once it is whole


class ResponseBuilder:
    """Accumulates one request's engine outputs into OpenAI's response or stream chunks."""

    def __init__(self, req: GenerationRequest, token_text: TokenText):
        self.req = req
        self._tt = token_text
        n = req.params.n
        self._n = n
        self.choices = [_Choice() for _ in range(len(req.prompts) * n)]
        self._prompt_cached = [0] * len(req.prompts)
        self._prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(req.prompts)
        self._remaining = len(self.choices)
        self.id = ("cmpl-" if req.kind == "completion" else "chatcmpl-") + req.request_id

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def add(self, prompt_index: int, out: RequestOutput) -> dict[str, Any] | None:
        """Account one output; when streaming, returns the chunk's choice entry (None when there
        is nothing to send)."""
        req = self.req
        index = prompt_index * self._n + out.index
        ch = self.choices[index]
        text, ids, lps = out.text, out.token_ids, out.logprobs
        if req.drop_output:
            text, ids, lps = "", [], None
        entry_lps: list[TokenLogprob | None] = []
        prefix = ""
        if req.echo and not ch.started:
            prefix = self._echo_text(prompt_index)
            if req.logprobs is not None:
                entry_lps.extend(self._prompt_logprobs(prompt_index, out))
        if req.logprobs is not None and lps:
            entry_lps.extend(lps)
        delta = prefix + text
        ch.text += delta
        ch.tokens += len(ids)
        if req.logprobs is not None:
            ch.logprobs.extend(entry_lps)
        if out.metrics is not None:
            self._prompt_cached[prompt_index] = out.metrics.cached_prompt_tokens
        first = not ch.started
        ch.started = True
        if out.finished:
            ch.finish_reason = out.finish_reason
            self._remaining -= 1
            if req.tools is not None:
                ch.calls = tool_calls(ch.text, req.tools)
                if ch.calls is not None:
                    ch.finish_reason = "tool_calls"
        if req.tools is not None and req.stream:  # a call is known only once the reply is whole
            return self._tool_delta(index, ch, first, out.finished)
        if not req.stream or (not delta and not out.finished and not entry_lps
                              and not (first and req.kind == "chat")):
            return None
        if req.kind == "completion":
            return {"index": index, "text": delta,
                    "logprobs": self._completion_logprobs(entry_lps, ch)
                    if req.logprobs is not None else None,
                    "finish_reason": ch.finish_reason if out.finished else None}
        d: dict[str, Any] = {"role": "assistant", "content": delta} if first else (
            {"content": delta} if delta else {})
        return {"index": index, "delta": d,
                "logprobs": {"content": self._chat_logprobs(entry_lps)}
                if req.logprobs is not None else None,
                "finish_reason": ch.finish_reason if out.finished else None}

    def _tool_delta(self, index: int, ch: _Choice, first: bool,
                    finished: bool) -> dict[str, Any] | None:
        """With tools, a chat stream holds the reply back and sends it whole at the end: as
        `tool_calls` deltas when it is a call, else as content (OpenAI allows either)."""
        if not first and not finished:
            return None
        d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if finished:
            if ch.calls is not None:
                d["content"] = None
                d["tool_calls"] = [{"index": i, **c} for i, c in enumerate(ch.calls)]
            else:
                d["content"] = ch.text
        return {"index": index, "delta": d, "logprobs": None,
                "finish_reason": ch.finish_reason if finished else None}

    def _echo_text(self, prompt_index: int) -> str:
        text = self.req.prompt_texts[prompt_index]
        if not text:
            ids = self.req.prompts[prompt_index]
            text = self._tt.decode(ids) if ids else ""
            self.req.prompt_texts[prompt_index] = text
        return text

    def _prompt_logprobs(self, prompt_index: int,
                         out: RequestOutput) -> list[TokenLogprob | None]:
        ids = self.req.prompts[prompt_index]
        if out.prompt_logprobs is not None:  # on the request's first output only
            self._prompt_lps[prompt_index] = out.prompt_logprobs
        got = self._prompt_lps[prompt_index] or []
        # The first prompt token has no logprob (nothing predicts it): keep its id for the
        # `tokens` list with a None logprob.
        result: list[TokenLogprob | None] = []
        for i, t in enumerate(ids):
            lp = got[i] if i < len(got) else None
            result.append(lp if lp is not None else TokenLogprob(t, math.nan, {}))
        return result

    # ---- logprob formats ---------------------------------------------------------------
    def _completion_logprobs(self, lps: list[TokenLogprob | None],
                             ch: _Choice) -> dict[str, Any]:
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for lp in lps:
            if lp is None:
                continue
            s = self._tt(lp.token_id)
            tokens.append(s)
            offsets.append(ch.offset)
            ch.offset += len(s)
            if math.isnan(lp.logprob):
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(_lp(lp.logprob))
            top = {self._tt(t): _lp(v) for t, v in sorted(lp.top.items(), key=lambda kv: -kv[1])}
            top.setdefault(s, _lp(lp.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_logprobs(self, lps: list[TokenLogprob | None]) -> list[dict[str, Any]]:
        k = self.req.logprobs or 0
        result = []
        for lp in lps:
            if lp is None:
                continue
            s = self._tt(lp.token_id)
            top = sorted(lp.top.items(), key=lambda kv: -kv[1])[:k]
            result.append({"token": s, "logprob": _lp(lp.logprob), "bytes": list(s.encode()),
                           "top_logprobs": [{"token": self._tt(t), "logprob": _lp(v),
                                             "bytes": list(self._tt(t).encode())}
                                            for t, v in top]})
        return result

    # ---- whole objects -----------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.req.prompts)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self._prompt_cached)}}

    def chunk(self, choices: list[dict[str, Any]],
              usage: dict[str, Any] | None = None) -> dict[str, Any]:
        obj = "text_completion" if self.req.kind == "completion" else "chat.completion.chunk"
        c: dict[str, Any] = {"id": self.id, "object": obj, "created": self.req.created,
                             "model": self.req.model, "choices": choices}
        if usage is not None or self.req.include_usage:
            c["usage"] = usage
        return c

    def response(self) -> dict[str, Any]:
        req = self.req
        choices = []
        for i, ch in enumerate(self.choices):
            if req.kind == "completion":
                lps = None
                if req.logprobs is not None:
                    ch.offset = 0
                    lps = self._completion_logprobs(ch.logprobs, ch)
                choices.append({"index": i, "text": ch.text, "logprobs": lps,
                                "finish_reason": ch.finish_reason})
            else:
                message: dict[str, Any] = {"role": "assistant", "content": ch.text}
                if ch.calls is not None:
                    message = {"role": "assistant", "content": None, "tool_calls": ch.calls}
                choices.append({"index": i, "message": message,
                                "logprobs": {"content": self._chat_logprobs(ch.logprobs)}
                                if req.logprobs is not None else None,
                                "finish_reason": ch.finish_reason})
        return {"id": self.id,
                "object": "text_completion" if req.kind == "completion" else "chat.completion",
                "created": req.created, "model": req.model, "choices": choices,
                "usage": self.usage()}


def models_response(model_name: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "edgert", "max_model_len": max_model_len}]}
