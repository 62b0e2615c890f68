"""Building a model straight on its device, in its dtype, without a host copy of the weights.

:func:`empty_model` builds the module tree on the meta device (no memory) and allocates every
parameter empty on the target device, the routed experts of each MoE layer already stacked
(``SparseMoE.pack_experts``: one (E, 2I, H) and one (E, H, I) tensor per layer, the experts'
parameters views of them). The caller then fills the parameters: random draws on the device
(``HybridForCausalLM.init_weights``) or tensors read one at a time from a checkpoint
(``prfaas.model.checkpoint.load_checkpoint``). Peak memory on the device is the model itself; on the
host, nothing of the model's size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prfaas.model.config import ModelConfig
from prfaas.model.layers import SparseMoE
from prfaas.model.model import HybridForCausalLM
from prfaas.model.tp.group import TPGroup

DtypeOf = Callable[[str, torch.Tensor], torch.dtype]


def empty_model(
    cfg: ModelConfig,
    device: str | torch.device,
    dtype_of: DtypeOf | torch.dtype,
    tp: TPGroup | None = None,
) -> HybridForCausalLM:
    """The model (of tensor-parallel rank ``tp``, if given) with uninitialised parameters on
    ``device``. ``dtype_of(name, meta_param)`` (or one dtype for all floating parameters) gives
    each parameter's dtype; the experts of a layer take the dtype of its expert 0's ``w1``."""
    dev = torch.device(device)
    pick: DtypeOf = (lambda n, p: dtype_of) if isinstance(dtype_of, torch.dtype) else dtype_of
    with torch.device("meta"):
        model = HybridForCausalLM(cfg, tp)
    for name, mod in model.named_modules():
        if isinstance(mod, SparseMoE):
            w1 = mod.experts[0].w1.weight
            mod.pack_experts(dev, pick(f"{name}.experts.0.w1.weight", w1))
    done: dict[int, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:  # tied parameters stay tied
                full = f"{mname}.{pname}" if mname else pname
                dt = pick(full, p) if p.is_floating_point() else p.dtype
                done[id(p)] = nn.Parameter(
                    torch.empty(p.shape, device=dev, dtype=dt), requires_grad=p.requires_grad
                )
            mod._parameters[pname] = done[id(p)]
    return model


def random_model(
    cfg: ModelConfig,
    device: str | torch.device,
    dtype: DtypeOf | torch.dtype,
    seed: int = 0,
    tp: TPGroup | None = None,
) -> HybridForCausalLM:
    """Random weights drawn on ``device`` (see ``init_weights``), each parameter in the dtype
    ``dtype`` gives it (see :func:`empty_model`); with ``tp``, the rank's slices of them."""
    return empty_model(cfg, device, dtype, tp).init_weights(seed).eval()
