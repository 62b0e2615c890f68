"""Tokenizers: a byte-level default, and a model directory's ``tokenizer.json`` when present."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS = 256, EOS = 257; ids above 255 decode to nothing."""

    bos_token_id: int | None = 256
    eos_token_id: int | None = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` JSON tokenizer (e.g. a checkpoint's tokenizer.json)."""

    def __init__(self, path: str | Path, eos_token_id: int | None = None) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.eos_token_id = eos_token_id
        self.bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model: str, eos_token_id: int | None = None) -> Tokenizer:
    p = Path(model)
    if p.is_dir() and (p / "tokenizer.json").exists():
        return HFTokenizer(p / "tokenizer.json", eos_token_id)
    return ByteTokenizer()
