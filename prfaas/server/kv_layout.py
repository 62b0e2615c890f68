"""Adapter: the transfer layer's ``CacheLayout`` of an engine's cache (tensor dtypes as exported)."""

from __future__ import annotations

import torch

from prfaas.engine import LLMEngine
from prfaas.transfer.layout import CacheLayout


def layout_for_engine(engine: LLMEngine) -> CacheLayout:
    """What ``engine.export_request`` produces: MLA latent KV in the cache dtype, KDA state fp32,
    short-conv state in the cache dtype; up to ``max_model_len`` tokens."""
    m = engine.model_config
    dtype = engine.cache.tensors.mla_kv[0].dtype
    conv_dtype = engine.cache.tensors.conv_state[0].dtype
    assert engine.cache.tensors.kda_state[0].dtype == torch.float32
    return CacheLayout.kimi_linear(
        m.fingerprint(),
        m.layer_kinds,
        kv_dim=m.latent_dim,
        kv_dtype=dtype,
        kda_heads=m.kda_num_heads,
        head_dim=m.kda_head_dim,
        conv_kernel=m.short_conv_kernel_size,
        conv_dtype=conv_dtype,
        max_tokens=engine.config.max_model_len,
    )
