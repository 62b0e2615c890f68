"""Adapter: the ``CacheLayout`` of an engine's cache (made by the cache, up to ``max_model_len``)."""

from __future__ import annotations

from prfaas.engine import LLMEngine
from prfaas.kv.layout import CacheLayout


def layout_for_engine(engine: LLMEngine) -> CacheLayout:
    """What ``engine.export_request`` produces, as ``engine.cache.layout`` describes it."""
    return engine.cache.layout(engine.config.max_model_len)
