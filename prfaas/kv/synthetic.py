"""Synthetic ``KVExport``s with the real tensor layouts, for tests and benchmarks."""

from __future__ import annotations

import torch

from prfaas.kv.layout import CacheLayout
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader


def random_export(
    layout: CacheLayout,
    request_id: str,
    token_start: int,
    token_end: int,
    seed: int = 0,
    device: str = "cpu",
) -> KVExport:
    """A request carrying MLA KV for tokens ``[token_start, token_end)`` and random KDA states."""
    if not 0 <= token_start <= token_end <= layout.max_tokens:
        raise ValueError(f"bad token range [{token_start}, {token_end}) for {layout.max_tokens}")
    gen = torch.Generator().manual_seed(seed)
    n = token_end - token_start
    parts = []
    for i, kind in enumerate(layout.layer_kinds):
        tensors = {}
        for name, spec in layout.layer_specs(i).items():
            shape = spec.resolve(n)
            if spec.dtype.is_floating_point:
                t = torch.randn(shape, generator=gen).to(spec.dtype)
            else:
                t = torch.randint(0, 100, shape, generator=gen).to(spec.dtype)
            tensors[name] = t.to(device)
        parts.append(LayerPart(i, kind, tensors))
    header = TransferHeader(
        request_id=request_id,
        model_fingerprint=layout.model_fingerprint,
        num_layers=layout.num_layers,
        layer_kinds=list(layout.layer_kinds),
        token_start=token_start,
        token_end=token_end,
        # token_end = prompt length - 1: the decode node computes the last prompt token
        prompt_token_ids=torch.randint(0, 163840, (token_end + 1,), generator=gen).tolist(),
        prefix_hashes=list(range((token_end + 1) // 512)),
        meta={"seed": seed},
    )
    return KVExport(header, parts)
