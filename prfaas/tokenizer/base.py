"""The tokenizer interface prfaas uses, and the byte-level tokenizer of the presets.

``encode(text)`` reads special-token text in ``text`` as the special token (as the checkpoints'
own tokenizers do); ``encode(text, allow_special=False)`` reads all of it as plain text.
``decode(ids)`` drops special tokens (the text a client sees); ``skip_special_tokens=False``
keeps their text. ``stop_token_ids``: the ids that end a generation unless a request sets
``ignore_eos`` (eos of the tokenizer, config.json and generation_config.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def stop_ids_of(tokenizer: object) -> frozenset[int]:
    """The default stop ids of a tokenizer: its ``stop_token_ids`` (when it has them) and its
    ``eos_token_id``."""
    ids = set(getattr(tokenizer, "stop_token_ids", ()) or ())
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    return frozenset(ids)


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS = 256, EOS = 257; ids above 255 decode to nothing."""

    bos_token_id: int | None = 256
    eos_token_id: int | None = 257
    stop_token_ids: tuple[int, ...] = (257,)
    vocab_size = 258

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
