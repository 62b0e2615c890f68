"""A model directory's ``tokenizer.json`` (the ``tokenizers`` library)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path


class HFTokenizer:
    """A ``tokenizers`` JSON tokenizer; added tokens in the text are read as those tokens unless
    ``allow_special`` is False."""

    def __init__(
        self,
        path: str | Path,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self._lock = threading.Lock()
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.stop_token_ids = tuple(stop_token_ids)
        self.special_tokens = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            return self._tok.encode(text, add_special_tokens=False).ids
        with self._lock:  # encode_special_tokens: added tokens' text is read as plain text
            self._tok.encode_special_tokens = True
            try:
                return self._tok.encode(text, add_special_tokens=False).ids
            finally:
                self._tok.encode_special_tokens = False

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
