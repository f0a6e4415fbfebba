"""Incremental detokenization: turn a growing list of output ids into text deltas for streaming.

Decoding all output ids at every step costs O(length) per token, and decoding each token alone is
wrong twice over: a byte-level BPE token can hold half of a UTF-8 character, and sentencepiece /
Metaspace decoders drop the leading space of whichever token comes first in the decoded list. So,
as vLLM and TGI do, decode a small window: the `prefix` tokens (already emitted, only there to
give the new ones their context) followed by the unread ones, and emit what the window's text has
beyond the prefix's text. Text that ends in U+FFFD is an incomplete character and is held back
until a later token completes it (or `flush` gives up at the end of the sequence). The window is
reset after every emission, so each token costs two decodes of a handful of ids: O(1), not O(n).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

# Prompt tokens kept as context in front of the first output token (vLLM uses 5): enough for the
# decoder to see a word boundary and the tail of a multi-byte character.
PREFIX_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of one sequence's output, fed one step's new ids at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] | Iterable[int],
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        prompt = [int(t) for t in prompt_token_ids]
        start = max(len(prompt) - PREFIX_TOKENS, 0)
        self._window: list[int] = prompt[start:]  # ids from the prefix offset on
        self._read = len(self._window)  # window index of the first unread id
        # A prompt given as ids can end inside a multi-byte character; its text then ends in
        # U+FFFD, which the output's first tokens turn into the real character. Counting only the
        # visible part as prefix makes that completed character part of the output text. (A prompt
        # that ends in a literal U+FFFD would see it repeated; prompts encoded from text never
        # end mid-character.)
        self._prefix_text = self._decode(self._window).rstrip(_REPLACEMENT)
        self._chunks: list[str] = []
        self._text: str | None = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _emit(self, final: bool) -> str:
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or (
                not final and new_text.endswith(_REPLACEMENT)):
            return ""  # nothing visible yet, or an incomplete character: keep the window growing
        delta = new_text[len(self._prefix_text):]
        # The unread ids become the next prefix; everything before them is no longer needed.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._chunks.append(delta)
        self._text = None
        return delta

    def add(self, token_ids: Iterable[int]) -> str:
        """Append new output ids; return the text they complete (possibly "")."""
        out = []
        for t in token_ids:  # one at a time, so a held character never delays the text before it
            self._window.append(int(t))
            out.append(self._emit(final=False))
        return "".join(out)

    def flush(self) -> str:
        """At the end of the sequence: release held text, an incomplete character as U+FFFD."""
        return self._emit(final=True)

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text
