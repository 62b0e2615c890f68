"""The stop tokens of a model directory: ``eos_token_id`` of ``config.json`` and of
``generation_config.json`` (each an id or a list of ids), and the tokenizer's eos token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return list(v)
    raise ValueError(f"eos_token_id must be an id or a list of ids, got {v!r}")


def read_stop_token_ids(directory: str | Path, tokenizer_eos: int | None = None) -> tuple[int, ...]:
    """Sorted, without repeats; a missing file contributes nothing."""
    d = Path(directory)
    ids = set(_ids(tokenizer_eos))
    for name in ("config.json", "generation_config.json"):
        f = d / name
        if f.is_file():
            try:
                ids.update(_ids(json.loads(f.read_text()).get("eos_token_id")))
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
    return tuple(sorted(ids))
