"""Tensor-parallel building blocks the model's layers use when ``tp`` (a ``TPGroup`` of size > 1)
is given; with ``tp`` None or of size 1 they are the plain layers (no collective, no overhead).

* :func:`row_linear`: an ``nn.Linear`` over the rank's slice of the input features whose partial
  outputs are summed over the ranks (vLLM's ``RowParallelLinear``); column-parallel projections
  need no class of their own: they are ``nn.Linear`` over the rank's output rows.
* :func:`ep_experts_forward`: the routed experts of one rank (expert parallel), from the
  whole-batch primitives of :mod:`prfaas.model.moe_ops` and :mod:`prfaas.model.moe_grouped`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prfaas.model import moe_grouped, moe_ops, triton_ops
from prfaas.model.tp.group import TPGroup


def tp_size(tp: TPGroup | None) -> int:
    return 1 if tp is None else tp.size


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x_r W_r^T)``: x_r the rank's slice of the input features, W_r the matching
    columns of the full weight. No bias (none of the model's linears has one)."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


def row_linear(full_in: int, out: int, tp: TPGroup | None) -> nn.Linear:
    """A linear layer of ``full_in / size`` inputs (the rank's slice) and ``out`` outputs, summed
    over the ranks; a plain ``nn.Linear(full_in, out)`` without tensor parallelism."""
    if tp_size(tp) == 1:
        return nn.Linear(full_in, out, bias=False)
    return RowParallelLinear(full_in // tp.size, out, tp)


def ep_experts_forward(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    first: int,
    w13: Tensor,
    w2: Tensor,
    shared: Tensor | None = None,
) -> Tensor:
    """This rank's share of ``moe_ops.experts_forward``: the (token, expert) pairs whose expert is
    one of the rank's (global ids ``first .. first + E_local - 1``), weighted and summed per token,
    plus ``shared`` (the rank's partial shared-expert output). Pairs of other ranks' experts add
    nothing here. Sums over the ranks give the full MoE output. No host sync.

    x (T, H); weights (T, k) fp32; idx (T, k) global expert ids; w13 (E_local, 2I, H);
    w2 (E_local, H, I). Returns (T, H) in x's dtype."""
    T, k = idx.shape
    E = w13.shape[0]
    local = idx - first
    mine = (local >= 0) & (local < E)
    if T * k <= moe_ops.SMALL_PAIRS and triton_ops.enabled(x):
        # a few decode rows: the per-pair kernels over every pair, the others' weighted by zero
        ids = torch.where(mine, local, 0)
        y = moe_ops.experts_forward(x, torch.where(mine, weights, 0.0), ids, w13, w2)
        return y if shared is None else (y.float() + shared.float()).to(x.dtype)
    # the other ranks' pairs get the sentinel id E: sorted last, outside every group, so the
    # grouped GEMMs do no work for them; their (unwritten) rows are zeroed before the combine
    ids = torch.where(mine, local, E)
    order, offs = moe_grouped.permute(ids, E)
    xs = x[order // k]
    h = moe_grouped.grouped_mm(xs, w13, offs)
    keep = (ids.reshape(-1)[order] < E)[:, None]
    h = h.masked_fill(~keep, 0)
    a = moe_ops.silu_mul_scaled(h, (weights.reshape(-1)[order] * keep[:, 0]).float())
    y = moe_grouped.grouped_mm(a, w2, offs).masked_fill(~keep, 0)
    return moe_ops.combine(y, moe_grouped.unpermute(order), k, shared, x.dtype)
