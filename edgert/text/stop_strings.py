"""Stop strings over a stream of text deltas.

A stop string can arrive split across deltas (tokens), so text that might be the start of one is
held back until it is not; the client must never see text past a stop, nor the stop itself unless
asked. Which stop wins is defined so that it does not depend on how the text was split: the stop
that is COMPLETED first (smallest end position), and among stops ending at the same place the one
that starts first. That is what a token-by-token check sees: generation ends the moment any stop
string is complete.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Feed text deltas; get back the text that is safe to emit and whether a stop was hit."""

    def __init__(self, stops: Iterable[str], include_stop: bool = False):
        self._stops = sorted({s for s in stops if s})
        self._include = include_stop
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text (vLLM's stop_reason)

    def feed(self, text_delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped). After a stop, every feed returns ("", True)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text_delta, False
        # Held text is shorter than the longest stop and contains no complete stop, so searching
        # held + delta finds every stop that this delta completes, and nothing older.
        buf = self._held + text_delta
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            self.stopped, self.matched, self._held = True, s, ""
            return buf[: end if self._include else start], True
        hold = self._held_tail(buf)
        self._held = buf[len(buf) - hold:]
        return buf[: len(buf) - hold], False

    def _held_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop.

        Only the last len(stop) - 1 characters can start one, and only where the stop's first
        character occurs: a few `startswith` calls per delta, not a scan over all prefixes."""
        hold = 0
        for s in self._stops:
            end = len(buf) - hold  # only starts before this give a longer tail than found so far
            pos = buf.find(s[0], max(len(buf) - len(s) + 1, 0), end)
            while pos != -1:
                if s.startswith(buf[pos:]):
                    hold = len(buf) - pos  # the earliest start is this stop's longest tail
                    break
                pos = buf.find(s[0], pos + 1, end)
        return hold

    def flush(self) -> str:
        """At the end of the text (no stop hit): release what was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
