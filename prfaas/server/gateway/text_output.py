"""Incremental detokenization with stop strings, checked on the detokenized text.

Text goes out only once it is final: a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and
the last ``len(longest stop) - 1`` characters are held back until more tokens arrive or the request
ends; a stop string ends the text just before it.

``min_tokens`` (as vLLM): a stop string counts only if it ends after the text of the first
``min_tokens`` tokens (one that starts within them and ends after them counts).
"""

from __future__ import annotations

from collections.abc import Sequence

from prfaas.tokenizer import Tokenizer


class TextAssembler:
    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str] = (), min_tokens: int = 0
    ) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.min_tokens = min_tokens
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # final text so far (or all of it once stopped / finished)
        self.emitted = 0
        self.stopped = False
        self._floor: int | None = 0 if min_tokens == 0 else None  # stops must end after this

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new tokens; returns the text that became final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        full = self.tokenizer.decode(self.ids)
        if self._floor is None and len(self.ids) > self.min_tokens:
            self._floor = len(self.tokenizer.decode(self.ids[: self.min_tokens]).rstrip("\ufffd"))
        cut = -1
        if self._floor is not None and self.stops:
            cut = min(
                (
                    i
                    for i in (
                        full.find(s, max(0, self.emitted - self.hold, self._floor - len(s) + 1))
                        for s in self.stops
                    )
                    if i >= 0
                ),
                default=-1,
            )
        if cut >= 0:
            self.stopped = True
            self.text = full[: max(cut, self.emitted)]
            return self._flush()
        end = len(full)
        while end > self.emitted and full[end - 1] == "\ufffd":
            end -= 1
        end = max(self.emitted, min(end, len(full) - self.hold))
        self.text = full
        out = full[self.emitted : end]
        self.emitted = end
        return out

    def finish(self) -> str:
        """The request ended: everything not yet emitted."""
        return self._flush()

    def _flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
