"""The random initial value of each parameter of a preset (what ``init_weights`` draws)."""

from __future__ import annotations

import math

import torch


def init_value(
    name: str, shape: torch.Size | tuple[int, ...], gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The random initial value of parameter ``name`` (fp32, drawn from ``gen`` on ``device``):
    fan-in scaled so that random logits are well spread."""
    kw = {"generator": gen, "device": device}
    if name.endswith("A_log"):
        return torch.empty(shape, device=device).uniform_(1, 16, generator=gen).log()
    if name.endswith("dt_bias"):
        dt = torch.exp(torch.rand(shape, **kw) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, **kw) * 0.01
    if "norm" in name:
        return torch.ones(shape, device=device)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, **kw)
    return torch.randn(shape, **kw) * (1 / math.sqrt(shape[-1]))  # linear and conv weights
