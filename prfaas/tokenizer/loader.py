"""Which tokenizer a model (a preset name or a model directory) gets.

* a preset: the byte tokenizer;
* a directory with ``tokenizer.json``: that tokenizer (``tokenizers``);
* a directory with ``tiktoken.model`` and ``tokenizer_config.json``: Kimi's tiktoken tokenizer;
* a directory whose ``tokenizer_config.json`` names ``PrfaasByteTokenizer`` (what
  ``save_checkpoint`` writes for a preset's weights): the byte tokenizer;
* any other directory: ``TokenizerNotFound`` naming the files found (never a silent fallback).

Each tokenizer's ``stop_token_ids`` are its eos plus config.json's and generation_config.json's.
"""

from __future__ import annotations

import json
from pathlib import Path

from prfaas.tokenizer.base import ByteTokenizer, Tokenizer
from prfaas.tokenizer.generation import read_stop_token_ids
from prfaas.tokenizer.hf_json import HFTokenizer
from prfaas.tokenizer.kimi import KimiTokenizer, token_text

BYTE_TOKENIZER_CLASS = "PrfaasByteTokenizer"
KIMI_TOKENIZER_CLASSES = (None, "TikTokenTokenizer")


class TokenizerNotFound(ValueError):
    """A model directory without tokenizer files prfaas can read."""


def model_dir(model: str | Path) -> Path | None:
    """The directory of a model given as a directory or its config.json; None for presets."""
    p = Path(model)
    if p.is_file():
        p = p.parent
    return p if p.is_dir() else None


def _tokenizer_config(d: Path) -> dict:
    f = d / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerNotFound(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise TokenizerNotFound(f"{f} is not a JSON object")
    return cfg


def load_tokenizer(model: str | Path, eos_token_id: int | None = None) -> Tokenizer:
    """The tokenizer of a preset or a model directory (see the module docstring).
    ``eos_token_id`` is the model config's eos, used when the tokenizer names none."""
    d = model_dir(model)
    if d is None:
        return ByteTokenizer()
    cfg = _tokenizer_config(d)
    cls = cfg.get("tokenizer_class")
    tok: Tokenizer
    if (d / "tokenizer.json").is_file():
        hf = HFTokenizer(d / "tokenizer.json")
        eos = hf.token_id(token_text(cfg.get("eos_token")) or "") if cfg else None
        bos = hf.token_id(token_text(cfg.get("bos_token")) or "") if cfg else None
        hf.eos_token_id = eos if eos is not None else eos_token_id
        hf.bos_token_id = bos
        tok = hf
    elif (d / "tiktoken.model").is_file() and (d / "tokenizer_config.json").is_file():
        if cls not in KIMI_TOKENIZER_CLASSES:
            raise TokenizerNotFound(
                f"{d}: tiktoken.model with tokenizer_class {cls!r}; prfaas reads Kimi's "
                f"tiktoken tokenizer (tokenizer_class TikTokenTokenizer)"
            )
        tok = KimiTokenizer(d)
        if tok.eos_token_id is None:
            tok.eos_token_id = eos_token_id
    elif cls == BYTE_TOKENIZER_CLASS:
        return ByteTokenizer()
    else:
        found = sorted(f.name for f in d.iterdir() if not f.name.endswith(".safetensors"))
        n_st = len(list(d.glob("*.safetensors")))
        raise TokenizerNotFound(
            f"{d}: no tokenizer prfaas can read. Expected tokenizer.json, or tiktoken.model with "
            f"tokenizer_config.json (Kimi); found {found}"
            + (f" and {n_st} .safetensors files" if n_st else "")
            + (f" (tokenizer_class {cls!r})" if cls else "")
        )
    tok.stop_token_ids = read_stop_token_ids(d, tok.eos_token_id)
    return tok
