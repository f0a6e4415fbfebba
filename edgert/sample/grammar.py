"""Constrained decoding: which tokens a grammar allows next, with llguidance.

A request's constraint arrives as an llguidance grammar (built from a JSON schema, a regex, a
choice list or a Lark grammar by the server, see serve/guided.py); here it meets the bundle's
tokenizer. llguidance builds its token trie from our own `tokenizer.json` (no torch, no
transformers) once, on the first constrained request, off the engine thread. Each constrained
choice gets a matcher that follows the tokens it accepts; the sampler receives one boolean row
per constrained row and masks only those rows, so an unconstrained request pays nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import llguidance


class GrammarError(ValueError):
    """A grammar that cannot be compiled for this tokenizer; the message names the problem."""


class Grammars:
    CACHED = 64  # compiled grammars kept (least recently used dropped)

    def __init__(self, tokenizer_json: Callable[[], str], eos_token_ids: list[int],
                 vocab_size: int):
        self._tokenizer_json = tokenizer_json  # called once, when first needed
        self._eos = list(eos_token_ids)
        self.vocab_size = vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._unusable: str | None = None  # why llguidance cannot take this tokenizer
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built once (0.2 s for a 49k vocabulary); any thread may be first. A tokenizer
        llguidance cannot take (no byte-level decoder, say) makes every constraint a clear
        GrammarError, never a failed server."""
        with self._lock:
            if self._ll is None and self._unusable is None:
                import llguidance

                try:  # one EOS id: llguidance before 1.7 (what glibc 2.31 boards get) takes no list
                    self._ll = llguidance.LLTokenizer(
                        self._tokenizer_json(), n_vocab=self.vocab_size,
                        eos_token=self._eos[0] if self._eos else None)
                except (ValueError, RuntimeError, TypeError) as e:
                    self._unusable = f"this model's tokenizer cannot be constrained ({e})"
            if self._ll is None:
                raise GrammarError(self._unusable)
            return self._ll

    def check(self, grammar: str) -> None:
        """Raise GrammarError naming why `grammar` cannot constrain this model."""
        self._prototype(grammar)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher: a copy of the grammar's compiled prototype (1 us instead of the
        0.5 ms a compile of a JSON schema takes here, and edge clients send one schema over
        and over)."""
        return self._prototype(grammar).deep_copy()

    def _prototype(self, grammar: str) -> llguidance.LLMatcher:
        """The grammar compiled once: the server's check, the engine's validation and every
        matcher share it (before, each of the three compiled it)."""
        with self._lock:
            m = self._compiled.get(grammar)
            if m is not None:
                self._compiled.move_to_end(grammar)
                return m
        import llguidance

        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error() or "invalid grammar")
        with self._lock:
            self._compiled[grammar] = m
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return m

    def allowed(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        """[len(matchers), vocab_size] bool: the tokens each matcher allows next. One bit per
        token from llguidance, unpacked with numpy (no Python loop over the vocabulary)."""
        import llguidance.numpy as lln

        bits = lln.allocate_token_bitmask(len(matchers), self.ll_tokenizer.vocab_size)
        for i, m in enumerate(matchers):
            lln.fill_next_token_bitmask(m, bits, i)
        mask = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").astype(bool)
        out = np.zeros((len(matchers), self.vocab_size), dtype=bool)
        width = min(self.vocab_size, mask.shape[1])
        out[:, :width] = mask[:, :width]
        return out
