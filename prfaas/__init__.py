"""prfaas: Prefill-as-a-Service for hybrid-attention (KDA + MLA) language models.

The engine names below load on first use, so importing a subpackage (``prfaas.transfer``,
``prfaas.scheduling``) does not load the engine or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        import prfaas.engine

        return getattr(prfaas.engine, name)
    raise AttributeError(f"module 'prfaas' has no attribute {name!r}")
