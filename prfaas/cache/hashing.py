"""The hash chain over full token blocks that keys the prefix cache (stable across processes)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", -1 if parent is None else parent))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(h.digest(), "little", signed=True)


def hash_chain(tokens: Sequence[int], block_size: int) -> list[int]:
    """One hash per FULL block of ``tokens``; block i's hash covers tokens [0, (i+1)*block_size)."""
    out: list[int] = []
    parent: int | None = None
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out
