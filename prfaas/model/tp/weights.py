"""A tensor-parallel rank's weights: random presets drawn as the whole model's and sliced (the same
model for any ``tensor_parallel_size``), checkpoints read whole tensor by tensor and sliced."""

from __future__ import annotations

import torch
from torch import nn

from prfaas.model.init_values import init_value
from prfaas.model.tp.shard import shard_tensor


@torch.no_grad()
def init_rank_weights(model: nn.Module, seed: int) -> None:
    """Fill the parameters of ``model`` (a ``HybridForCausalLM`` of rank ``model.tp.rank``) with its slices of the whole model that
    ``HybridForCausalLM(cfg).init_weights(seed)`` draws: every parameter of the whole model is
    drawn in the same order from one generator on the rank's device (one whole tensor at a time:
    peak memory is the largest parameter), and the rank keeps its slice."""
    tp, cfg = model.tp, model.config
    assert tp is not None
    params = dict(model.named_parameters())
    dev = next(iter(params.values())).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.device("meta"):
        whole = type(model)(cfg)  # the whole model, no memory
    for name, meta in whole.named_parameters():
        vals = init_value(name, meta.shape, gen, dev)
        got = shard_tensor(cfg, name, vals, tp.rank, tp.size)
        if got is not None:
            lname, part = got
            params[lname].copy_(part.to(params[lname].dtype))
        del vals
