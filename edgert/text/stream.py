"""The last stage of a sequence's data flow: sampled token -> stop checks -> text delta.

Stop rules, in order: EOS (unless ignore_eos) and stop token ids end the sequence without adding
their text; otherwise the token's text goes through the incremental detokenizer (never a broken
UTF-8 character) and the stop-string matcher (text that may begin a stop string is held back);
max_tokens and the model length end it as "length". On the end, held-back text is released."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgert.outputs import TokenLogprob
from edgert.sampling_params import SamplingParams
from edgert.text.detokenizer import IncrementalDetokenizer
from edgert.text.stop_strings import StopStringMatcher
from edgert.text.tokenizer import Tokenizer


@dataclass
class TokenStream:
    params: SamplingParams
    detok: IncrementalDetokenizer
    stops: StopStringMatcher | None
    stop_ids: frozenset[int]
    max_model_len: int
    # What has been produced since the last RequestOutput was emitted.
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # all text emitted so far
    finish_reason: str | None = None

    @classmethod
    def create(cls, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
               max_model_len: int) -> TokenStream:
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(tokenizer.eos_token_ids)
        return cls(
            params=params,
            detok=IncrementalDetokenizer(tokenizer.hf, prompt_ids,
                                         skip_special_tokens=params.skip_special_tokens),
            stops=(StopStringMatcher(params.stop, params.include_stop_str_in_output)
                   if params.stop else None),
            stop_ids=frozenset(stop_ids), max_model_len=max_model_len)

    def append(self, token_id: int, num_output: int, num_tokens: int,
               logprob: TokenLogprob | None = None) -> bool:
        """Account one sampled token (already appended to the sequence: it is the
        `num_output`-th output, the sequence now has `num_tokens`). True when finished."""
        self.pending_ids.append(token_id)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        if token_id in self.stop_ids:
            return self._finish("stop")
        delta = self.detok.add([token_id])
        if self.stops is not None and delta:
            delta, stopped = self.stops.feed(delta)
            self._emit(delta)
            if stopped:
                self.finish_reason = "stop"
                return True
        else:
            self._emit(delta)
        if num_output >= self.params.max_tokens or num_tokens >= self.max_model_len:
            return self._finish("length")
        return False

    def end(self, reason: str) -> None:
        """Finish from outside the stop rules (a constraint that completed or dead-ended):
        held-back text is released as on any other end."""
        if self.finish_reason is None:
            self._finish(reason)

    def _emit(self, text: str) -> None:
        self.pending_text += text
        self.text += text

    def _finish(self, reason: str) -> bool:
        self.finish_reason = reason
        tail = self.detok.flush()
        if self.stops is not None:
            tail, stopped = self.stops.feed(tail) if tail else ("", False)
            if not stopped:
                tail += self.stops.flush()
        self._emit(tail)
        return True

    def take(self) -> tuple[str, list[int], list[TokenLogprob] | None]:
        """Hand over what was produced since the last call."""
        out = (self.pending_text, self.pending_ids,
               self.pending_logprobs if self.params.logprobs is not None else None)
        self.pending_text, self.pending_ids, self.pending_logprobs = "", [], []
        return out
