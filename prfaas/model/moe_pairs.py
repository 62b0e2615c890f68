"""The MoE's per-pair path, for a few rows (decode): no permutation of the (token, expert) pairs.

Pair p is token p // k, choice p % k (P = T * k pairs). :func:`pair_gemv` multiplies each pair's
row by its expert's weights (one Triton kernel on CUDA, a gather and a ``bmm`` elsewhere);
:func:`pair_experts` is the whole routed-expert sum in two Triton kernels (CUDA only), the
shared expert fused in when :func:`fusable_shared`. Shapes: x (T, H), ``w13`` (E, 2I, H) the
stacked [gate | up], ``w2`` (E, H, I); sums in fp32, outputs in x's dtype. Which rows take this
path is :func:`prfaas.model.moe_ops.experts_forward`'s choice (``moe_ops.SMALL_PAIRS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prfaas.model import moe_kernels, triton_ops

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

# the per-pair kernels' blocks (BN outputs, BK inputs per step) and launch options, tuned on an
# H200 at one token (benchmarks/gpu_tune_moe.py, benchmarks/results/moe_tune_h200.json)
PAIR_CONFIG = {
    "gate_up": {"BN": 16, "BK": 128, "num_warps": 8, "num_stages": 3},
    "down": {"BN": 4, "BK": 512, "num_warps": 8, "num_stages": 3},
}


def pair_gemv(x: Tensor, ids: Tensor, w: Tensor, div: int) -> Tensor:
    """y[p] = w[ids[p]] @ x[p // div] for every pair p: x (R, K), ids (P,), w (E, N, K).
    On CUDA one Triton kernel (each program streams one pair's expert rows once); elsewhere a
    gather of the weights and a batched product. Returns (P, N) in x's dtype."""
    P, N, K = ids.shape[0], w.shape[1], w.shape[2]
    if triton_ops.enabled(x):
        x = x.contiguous()
        y = torch.empty(P, N, dtype=x.dtype, device=x.device)
        bn, bk = 32, 256
        if P:
            moe_kernels.pair_gemv_kernel[(P, triton.cdiv(N, bn))](
                x, ids, w, y, N, K=K, DIV=div, BN=bn, BK=bk, num_warps=4
            )
        return y
    rows = torch.arange(P, device=x.device) // div
    return torch.bmm(w[ids].to(x.dtype), x[rows][:, :, None])[:, :, 0]


def fusable_shared(shared_weights: tuple[Tensor, Tensor] | None, w13: Tensor, w2: Tensor) -> bool:
    """Whether the shared MLP has the routed experts' shapes (it then rides in the pair kernels)."""
    if shared_weights is None:
        return False
    s13, s2 = shared_weights
    return (
        s13.shape == w13.shape[1:]
        and s2.shape == w2.shape[1:]
        and s13.dtype == w13.dtype
        and s2.dtype == w2.dtype
        and s13.is_contiguous()
        and s2.is_contiguous()
    )


def pair_experts(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    w13: Tensor,
    w2: Tensor,
    shared_weights: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`prfaas.model.moe_ops.experts_forward` for a few rows on CUDA, no permutation, two
    Triton kernels: one program per (pair, BN rows of the expert's gate and up) computes
    ``silu(gate) * up * weight`` (the shared expert as one more pair per token, weight 1); one
    program per (token, BN output columns) streams the down rows of its k experts and the shared
    one and writes the sum. ``shared_weights`` must pass :func:`fusable_shared` (or be None)."""
    T, k = idx.shape
    P, H, inter = T * k, x.shape[1], w2.shape[2]
    fuse = shared_weights is not None
    s13, s2 = shared_weights if fuse else (w13, w2)
    x = x.contiguous()
    rows = P + (T if fuse else 0)
    a = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if not T:
        return out
    cg, cd = PAIR_CONFIG["gate_up"], PAIR_CONFIG["down"]
    moe_kernels.pair_gate_up_kernel[(rows, triton.cdiv(inter, cg["BN"]))](
        x,
        idx.reshape(-1),
        weights.reshape(-1).float().contiguous(),
        w13,
        s13,
        a,
        P,
        INTER=inter,
        H=H,
        DIV=k,
        BN=cg["BN"],
        BK=cg["BK"],
        num_warps=cg["num_warps"],
        num_stages=cg["num_stages"],
    )
    moe_kernels.pair_down_kernel[(T, triton.cdiv(H, cd["BN"]))](
        a,
        idx.reshape(-1),
        w2,
        s2,
        out,
        P,
        H,
        INTER=inter,
        KTOP=k,
        HAS_SHARED=fuse,
        BN=cd["BN"],
        BK=cd["BK"],
        num_warps=cd["num_warps"],
        num_stages=cd["num_stages"],
    )
    return out
