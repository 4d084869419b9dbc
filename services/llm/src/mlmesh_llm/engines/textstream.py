"""Incremental detokenization with stop strings.

Decodes the whole completion each time (byte-level BPE tokens can split a
UTF-8 character, so per-token decoding is wrong), emits only the new text,
holds back an incomplete character, and holds back text that could still
become a stop string, so a stop string is never streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self._sent = 0  # characters already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that is safe to emit now."""
        self.ids.append(token_id)
        text = self._decode(self.ids)
        for stop in self._stop:
            at = text.find(stop, max(self._sent - len(stop), 0))
            if at != -1:
                self.stopped = True
                out = text[self._sent : at]
                self._sent = at
                return out
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        safe = len(text) - self._hold
        if safe <= self._sent:
            return ""
        out = text[self._sent : safe]
        self._sent = safe
        return out

    def flush(self) -> str:
        """The held-back text, at the end of a request not ended by a stop."""
        if self.stopped:
            return ""
        text = self._decode(self.ids).rstrip("\ufffd")
        out = text[self._sent :]
        self._sent = len(text)
        return out
