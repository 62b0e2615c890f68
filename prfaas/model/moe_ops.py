"""The routed-expert MoE as a few whole-batch kernels, with no host synchronisation (so a decode
step that runs it can be captured in a CUDA graph): its entry points :func:`route` and
:func:`experts_forward`, the choice between its paths, and the pieces both paths share
(:func:`combine`, :func:`silu_mul_scaled`, :func:`shared_mlp`). The paths live in
:mod:`prfaas.model.moe_pairs` (a few rows) and :mod:`prfaas.model.moe_grouped` (many rows), the
Triton kernels in :mod:`prfaas.model.moe_kernels`.

Contract of :func:`experts_forward` with :func:`route` (the same function as ``SparseMoE``'s
reference loop, which stays the readable version):

1. routing (:func:`route`): ``scores = sigmoid(x W_gate^T)`` in fp32; the experts are the top-k of
   ``scores + e_score_correction_bias`` (the bias chooses, it does not weight), largest first; the
   weights are the chosen *scores*, renormalised to sum 1 (optional) and times
   ``routed_scaling_factor``. On CUDA two Triton kernels (logits, then a per-token top-k);
2. the experts: ``sum_j weight_j * w2_e (silu(w1_e x) * w3_e x)`` over each token's k experts
   ``e``, with ``w13`` (E, 2I, H) the stacked [w1 | w3] and ``w2`` (E, H, I), plus the shared
   experts, summed in fp32, returned in x's dtype. On CUDA, by size (pairs = tokens * k):

   * at most ``SMALL_PAIRS``: :func:`moe_pairs.pair_experts`, two Triton kernels and no
     permutation (one streams each pair's gate and up rows with SiLU and the weight in its
     epilogue, the shared expert as one more pair; one streams each token's down rows and sums);
   * up to ``TRITON_MAX_PAIRS``: :func:`moe_grouped.align_blocks` (each expert's pairs padded to
     whole row blocks on the device) and :func:`moe_grouped.fused_experts`, a Triton grouped GEMM
     that gathers its rows inside the kernel, twice, then :func:`combine`;
   * above: a stable sort of the pairs by expert, group ends by ``searchsorted``,
     ``torch._grouped_mm`` (CUTLASS, bf16 on Hopper) for gate|up and for down, the inverse
     permutation and :func:`combine` (one deterministic gather, no atomics).

   Elsewhere (CPU) the sort path with :func:`moe_grouped.grouped_mm_reference`, a loop over the
   groups that reads the group ends on the host. The block sizes were tuned on an H200
   (benchmarks/gpu_tune_moe.py, benchmarks/results/moe_tune_h200.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prfaas.model import moe_grouped, moe_kernels, moe_pairs, triton_ops

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

ROUTER_GEMV_ROWS = 64  # at most this many tokens: the router's logits by a Triton GEMV
# router_logits_kernel's blocks (tuned on an H200, benchmarks/results/moe_tune_h200.json)
ROUTER_CONFIG = {"BE": 2, "BK": 512, "num_warps": 4}


def route(
    x: Tensor,
    gate_weight: Tensor,
    bias: Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """x (T, H) -> (weights (T, k) fp32, expert ids (T, k) int64), on x's device, no sync.

    On CUDA two kernels: the logits in fp32 (a Triton GEMV reading x in its dtype for up to
    ``ROUTER_GEMV_ROWS`` tokens, else an fp32 GEMM), then one Triton kernel per token for the
    sigmoid, the biased top-k (largest first), the gather, the renormalisation and the scaling."""
    if triton_ops.enabled(x) and x.dim() == 2:
        T, H = x.shape
        E = gate_weight.shape[0]
        w = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
        idx = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
        if not T:
            return w, idx
        if T <= ROUTER_GEMV_ROWS:
            x = x if x.stride(-1) == 1 else x.contiguous()
            logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
            c = ROUTER_CONFIG
            moe_kernels.router_logits_kernel[(T, triton.cdiv(E, c["BE"]))](
                x,
                gate_weight.contiguous(),
                logits,
                x.stride(0),
                E,
                H=H,
                BE=c["BE"],
                BK=c["BK"],
                num_warps=c["num_warps"],
            )
        else:
            logits = F.linear(x.float(), gate_weight.float())
        moe_kernels.route_topk_kernel[(T,)](
            logits,
            bias.contiguous(),
            w,
            idx,
            E,
            float(scaling),
            K=top_k,
            KP=triton.next_power_of_2(top_k),
            RENORM=bool(renormalize),
            BE=triton.next_power_of_2(E),
        )
        return w, idx
    scores = torch.sigmoid(F.linear(x.float(), gate_weight.float()))
    idx = torch.topk(scores + bias.float(), top_k, dim=-1, sorted=True).indices
    w = scores.gather(-1, idx)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, idx


def silu_mul_scaled(gate_up: Tensor, scale: Tensor) -> Tensor:
    """``silu(gate) * up * scale[:, None]`` for gate_up (M, 2I) = [gate | up], scale (M,) fp32."""
    if triton_ops.enabled(gate_up):
        return triton_ops.silu_mul(gate_up, row_scale=scale)
    n = gate_up.shape[-1] // 2
    g, u = gate_up[:, :n].float(), gate_up[:, n:].float()
    return (F.silu(g) * u * scale[:, None]).to(gate_up.dtype)


def combine(
    y: Tensor, inv: Tensor | None, k: int, shared: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """out[t] = sum_j y[inv[t*k + j]] (+ shared[t]), summed in fp32, returned in ``dtype``.

    y (T*k, H) the pairs' weighted outputs in expert order; inv (T*k,) the row of pair p in y
    (None: y is in pair order). On CUDA one Triton kernel (no (T*k, H) un-permuted copy);
    elsewhere a gather and a sum."""
    T, H = y.shape[0] // k, y.shape[1]
    if triton_ops.enabled(y):
        out = torch.empty(T, H, dtype=dtype, device=y.device)
        block = 1024
        if T:
            sh = shared.contiguous() if shared is not None else out
            moe_kernels.combine_kernel[(T, triton.cdiv(H, block))](
                y,
                inv if inv is not None else y,
                sh,
                out,
                H,
                K=k,
                HAS_SHARED=shared is not None,
                IDENTITY=inv is None,
                BLOCK=block,
            )
        return out
    out = (y if inv is None else y[inv]).view(T, k, H).sum(1, dtype=torch.float32)
    if shared is not None:
        out = out + shared.float()
    return out.to(dtype)


def shared_mlp(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The shared experts as one SwiGLU MLP: ``w2 @ (silu(gate) * up)`` with [gate | up] =
    ``w13 @ x`` (w13 (2I, H), w2 (H, I)); x (T, H). Returns (T, H) in x's dtype."""
    h = F.linear(x, w13)
    if triton_ops.enabled(x):
        a = triton_ops.silu_mul(h)
    else:
        n = h.shape[-1] // 2
        a = F.silu(h[:, :n]) * h[:, n:]
    return F.linear(a, w2)


# which path experts_forward takes, by the number of (token, expert) pairs:
SMALL_PAIRS = 64  # at most this many (token, expert) pairs: the per-pair GEMV path
# the grouped GEMMs of the permuted path: "auto" (the Triton grouped GEMM of
# :func:`moe_grouped.fused_experts` up to TRITON_MAX_PAIRS pairs, ``torch._grouped_mm`` above),
# "triton" or "grouped_mm". On an H200 (benchmarks/results/moe_tune_h200.json, one MoE layer of
# the 48B geometry): 256 pairs 0.57 vs 0.83 ms, 1024 pairs 0.91 vs 1.26 ms, 8192 pairs 1.19 vs
# 1.34 ms, 65536 pairs 2.71 vs 2.35 ms.
GROUPED_IMPL = "auto"
TRITON_MAX_PAIRS = 8192


def use_triton_grouped(pairs: int) -> bool:
    """Whether the permuted path of ``pairs`` (token, expert) pairs runs
    :func:`moe_grouped.fused_experts`."""
    if GROUPED_IMPL == "auto":
        return pairs <= TRITON_MAX_PAIRS
    return GROUPED_IMPL == "triton"


def experts_forward(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    w13: Tensor,
    w2: Tensor,
    shared: Tensor | None = None,
    shared_weights: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Sum over each token's chosen experts of ``weight * expert(x)``, plus the shared experts'
    output, summed in fp32.

    x (T, H); weights (T, k) fp32; idx (T, k) expert ids; w13 (E, 2I, H) the stacked [w1 | w3]
    (gate | up) weights; w2 (E, H, I). The shared experts: either their output ``shared`` (T, H)
    or their weights ``shared_weights`` = (w13 (2I', H), w2 (H, I')) (:func:`shared_mlp`; on the
    per-pair path fused into its kernels). Returns (T, H) in x's dtype."""
    T, k = idx.shape
    small = T * k <= SMALL_PAIRS and triton_ops.enabled(x)
    if (
        small
        and shared is None
        and (shared_weights is None or moe_pairs.fusable_shared(shared_weights, w13, w2))
    ):  # decode of a few rows: no permutation
        return moe_pairs.pair_experts(x, weights, idx, w13, w2, shared_weights)
    if shared is None and shared_weights is not None:
        shared = shared_mlp(x, *shared_weights)
    if small:
        ids = idx.reshape(-1)
        h = moe_pairs.pair_gemv(x, ids, w13, div=k)  # (T*k, 2I) in pair order
        a = silu_mul_scaled(h, weights.reshape(-1).float())
        return combine(moe_pairs.pair_gemv(a, ids, w2, div=1), None, k, shared, x.dtype)
    if triton_ops.enabled(x) and use_triton_grouped(T * k):
        return combine(
            moe_grouped.fused_experts(x, weights, idx, w13, w2), None, k, shared, x.dtype
        )
    order, offs = moe_grouped.permute(idx, w13.shape[0])
    xs = x[order // k]  # (T*k, H) the pairs' inputs, grouped by expert
    h = moe_grouped.grouped_mm(xs, w13, offs)  # (T*k, 2I)
    a = silu_mul_scaled(h, weights.reshape(-1)[order].float())
    y = moe_grouped.grouped_mm(a, w2, offs)  # (T*k, H), already weighted
    return combine(y, moe_grouped.unpermute(order), k, shared, x.dtype)
