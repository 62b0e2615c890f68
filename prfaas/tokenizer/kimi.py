"""Kimi's tiktoken tokenizer: a model directory with ``tiktoken.model`` (one line per token:
base64 of its bytes, a space, its rank) and ``tokenizer_config.json`` (``added_tokens_decoder``,
``bos_token``, ``eos_token``), read as the release's ``tokenization_kimi.py`` reads them.

* The base vocabulary is the ranks of ``tiktoken.model``; the special tokens are the ids
  ``n_base .. n_base + 257`` (256 reserved ids + 2), named by ``added_tokens_decoder`` or else
  ``<|reserved_token_{id}|>``.
* ``encode(text)`` is Kimi's ``encode``: specials' text becomes their ids; the text is cut into
  pieces of at most 400,000 characters and runs of at most 25,000 whitespace or non-whitespace
  characters (a tiktoken limit) before BPE with ``PAT_STR``. ``allow_special=False`` is Kimi's
  ``allow_special_tokens=False``: all text is plain text.
* ``decode(ids, skip_special_tokens=False)`` is Kimi's ``decode`` (invalid UTF-8 becomes U+FFFD).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_RESERVED_SPECIAL = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def read_ranks(path: Path) -> dict[bytes, int]:
    """``tiktoken.model``: token bytes -> rank (read directly: tiktoken's loader caches by path)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not 'base64 rank': {line[:60]!r}") from e
    return ranks


def token_text(v: Any) -> str | None:
    """A tokenizer_config token entry: a string or ``{"content": ...}``."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _runs(s: str, limit: int) -> Iterator[str]:
    """``s`` cut so that no piece holds more than ``limit`` consecutive whitespace or
    non-whitespace characters (Kimi's ``_split_whitespaces_or_nonwhitespaces``)."""
    run, space, start = 0, s[0].isspace() if s else False, 0
    for i, c in enumerate(s):
        now = c.isspace()
        if space ^ now:
            run, space = 1, now
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class KimiTokenizer:
    def __init__(self, directory: str | Path) -> None:
        import tiktoken

        d = Path(directory)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        ranks = read_ranks(d / "tiktoken.model")
        n_base = len(ranks)
        if sorted(ranks.values()) != list(range(n_base)):
            raise ValueError(f"{d / 'tiktoken.model'}: ranks are not 0..{n_base - 1}")
        named = {int(i): token_text(v) for i, v in (cfg.get("added_tokens_decoder") or {}).items()}
        hi = n_base + NUM_RESERVED_SPECIAL + 2
        outside = sorted(i for i in named if not n_base <= i < hi)
        if outside:
            raise ValueError(
                f"{d / 'tokenizer_config.json'}: added_tokens_decoder ids {outside[:5]} lie outside "
                f"the special range {n_base}..{hi - 1} that follows the {n_base} tiktoken ranks"
            )
        self.special_tokens: dict[str, int] = {
            named.get(i) or f"<|reserved_token_{i}|>": i for i in range(n_base, hi)
        }
        self.special_ids = frozenset(self.special_tokens.values())
        self.n_base = n_base
        self.enc = tiktoken.Encoding(
            name=f"kimi:{d.name}",
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_token_id = self.token_id(token_text(cfg.get("bos_token")))
        self.eos_token_id = self.token_id(token_text(cfg.get("eos_token")))
        self.stop_token_ids: tuple[int, ...] = ()  # filled by the loader (generation config)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.special_tokens.get(text)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        out: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                if allow_special:
                    out.extend(self.enc.encode(piece, allowed_special="all"))
                else:
                    out.extend(self.enc.encode(piece, disallowed_special=()))
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = self.enc.n_vocab
        keep = [
            i for i in ids if 0 <= i < n and not (skip_special_tokens and i in self.special_ids)
        ]
        return self.enc.decode(keep)
