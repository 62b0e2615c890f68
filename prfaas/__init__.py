"""prfaas: Prefill-as-a-Service for hybrid-attention (KDA + MLA) language models.

The engine's names (``LLM``, ``EngineConfig``, ``LLMEngine``, ``RequestOutput``,
``SamplingParams``) are loaded on first use, so that importing a torch-free part of the package
(the gateway, the planner, the CLI's help) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.engine import LLM, EngineConfig, LLMEngine, RequestOutput, SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("prfaas.engine"), name)
    raise AttributeError(f"module 'prfaas' has no attribute {name!r}")
