"""The engine: ``LLMEngine``, the offline ``LLM``, ``SamplingParams``.  The names load on first
use, so ``prfaas.engine.cli`` (the ``generate`` command's parser) imports no torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]

_WHERE = {
    "EngineConfig": "prfaas.engine.config",
    "EngineStats": "prfaas.engine.stats",
    "LLMEngine": "prfaas.engine.engine",
    "LLM": "prfaas.engine.llm",
    "RequestOutput": "prfaas.engine.request",
    "SamplingParams": "prfaas.engine.sampling",
}

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.engine.config import EngineConfig
    from prfaas.engine.engine import LLMEngine
    from prfaas.engine.llm import LLM
    from prfaas.engine.request import RequestOutput
    from prfaas.engine.sampling import SamplingParams
    from prfaas.engine.stats import EngineStats


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'prfaas.engine' has no attribute {name!r}")
