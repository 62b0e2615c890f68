"""The routed-expert MoE as a few whole-batch kernels, with no host synchronisation (so a decode
step that runs it can be captured in a CUDA graph).

Contract of :func:`grouped_moe` (the same function as ``SparseMoE``'s reference loop, which stays
the readable version):

1. routing: ``scores = sigmoid(x W_gate^T)`` in fp32; the experts are the top-k of
   ``scores + e_score_correction_bias`` (the bias chooses, it does not weight); the weights are the
   chosen *scores*, renormalised to sum 1 (optional) and times ``routed_scaling_factor``;
2. permutation: the T*k (token, expert) pairs sorted by expert (a stable sort on the device); the
   group ends (``offs``, int32, cumulative) come from a ``searchsorted`` over the sorted ids, not
   from a host-side count;
3. one grouped GEMM over the stacked gate|up weights ``w13`` (E, 2I, H), SiLU(gate) * up times the
   pair's routing weight (one kernel on the GPU), one grouped GEMM over the stacked down weights
   ``w2`` (E, H, I);
4. un-permutation and the sum over each token's k rows in one gather (the inverse permutation
   says where pair t*k + j lies; no atomics, deterministic), with the shared experts' output added
   in the same pass.

On CUDA the grouped GEMMs are ``torch._grouped_mm`` (CUTLASS, bf16 on Hopper); elsewhere
:func:`grouped_mm_reference`, a loop over the groups (it reads the group ends on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prfaas.model import triton_ops

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _combine_kernel(
        y_ptr,
        inv_ptr,
        shared_ptr,
        out_ptr,
        H,
        K: tl.constexpr,
        HAS_SHARED: tl.constexpr,
        IDENTITY: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            if IDENTITY:
                r = t * K + j
            else:
                r = tl.load(inv_ptr + t * K + j).to(tl.int64)
            acc += tl.load(y_ptr + r * H + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_SHARED:
            acc += tl.load(shared_ptr + t * H + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _pair_gemv_kernel(
        x_ptr,
        ids_ptr,
        w_ptr,
        y_ptr,
        N,
        K: tl.constexpr,
        DIV: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        # y[p, n] = sum_k w[ids[p], n, k] * x[p // DIV, k]: one pair, BN outputs per program
        p = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        e = tl.load(ids_ptr + p).to(tl.int64)
        row = p // DIV
        acc = tl.zeros((BN,), dtype=tl.float32)
        w_rows = w_ptr + e * N * K + n[:, None].to(tl.int64) * K
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            xv = tl.load(x_ptr + row * K + kk, mask=km, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + kk[None, :], mask=(n[:, None] < N) & km[None, :], other=0.0)
            acc += tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
        tl.store(y_ptr + p * N + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


def route(
    x: Tensor,
    gate_weight: Tensor,
    bias: Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """x (T, H) -> (weights (T, k) fp32, expert ids (T, k) int64), on x's device, no sync."""
    scores = torch.sigmoid(F.linear(x.float(), gate_weight.float()))
    idx = torch.topk(scores + bias.float(), top_k, dim=-1, sorted=True).indices
    w = scores.gather(-1, idx)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, idx


def grouped_mm_reference(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows ``offs[e-1]:offs[e]`` of a (M, K) times ``w[e]^T`` (w: (E, N, K), nn.Linear layout),
    a loop over the groups (reads ``offs`` on the host). Returns (M, N) in a's dtype."""
    out = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    ends = offs.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = a[start:end] @ w[e].T.to(a.dtype)
        start = end
    return out


def capturable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the MoE of a model in ``dtype`` on ``device`` runs without host syncs (so its
    decode can be captured in a CUDA graph): bf16 on a Hopper GPU, where the grouped GEMMs are
    ``torch._grouped_mm`` (elsewhere they are loops that read the group ends on the host)."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_grouped_mm")
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def grouped_mm(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """:func:`grouped_mm_reference`'s function; on a Hopper GPU in bf16, ``torch._grouped_mm``
    (no host sync: the group ends stay on the device)."""
    if a.dtype == w.dtype and capturable(a.dtype, a.device):
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    return grouped_mm_reference(a, w, offs)


def silu_mul_scaled(gate_up: Tensor, scale: Tensor) -> Tensor:
    """``silu(gate) * up * scale[:, None]`` for gate_up (M, 2I) = [gate | up], scale (M,) fp32."""
    if triton_ops.enabled(gate_up):
        return triton_ops.silu_mul(gate_up, row_scale=scale)
    n = gate_up.shape[-1] // 2
    g, u = gate_up[:, :n].float(), gate_up[:, n:].float()
    return (F.silu(g) * u * scale[:, None]).to(gate_up.dtype)


def permute(idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Expert ids (T, k) -> (order (T*k,): the flat pair indices sorted by expert, stable;
    offs (E,) int32: cumulative group ends). Pair p is token p // k, choice p % k."""
    flat = idx.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=idx.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
    return order, offs


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
            _combine_kernel[(T, triton.cdiv(H, block))](
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


SMALL_PAIRS = 64  # at most this many (token, expert) pairs: the per-pair GEMV path


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
            _pair_gemv_kernel[(P, triton.cdiv(N, bn))](
                x, ids, w, y, N, K=K, DIV=div, BN=bn, BK=bk, num_warps=4
            )
        return y
    rows = torch.arange(P, device=x.device) // div
    return torch.bmm(w[ids].to(x.dtype), x[rows][:, :, None])[:, :, 0]


def experts_forward(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    w13: Tensor,
    w2: Tensor,
    shared: Tensor | None = None,
) -> Tensor:
    """Sum over each token's chosen experts of ``weight * expert(x)``, plus ``shared`` (the
    shared experts' output, (T, H)) when given, summed in fp32.

    x (T, H); weights (T, k) fp32; idx (T, k) expert ids; w13 (E, 2I, H) the stacked [w1 | w3]
    (gate | up) weights; w2 (E, H, I). Returns (T, H) in x's dtype."""
    T, k = idx.shape
    if T * k <= SMALL_PAIRS and triton_ops.enabled(x):  # decode of a few rows: no permutation
        ids = idx.reshape(-1)
        h = pair_gemv(x, ids, w13, div=k)  # (T*k, 2I) in pair order
        a = silu_mul_scaled(h, weights.reshape(-1).float())
        return combine(pair_gemv(a, ids, w2, div=1), None, k, shared, x.dtype)
    order, offs = permute(idx, w13.shape[0])
    xs = x[order // k]  # (T*k, H) the pairs' inputs, grouped by expert
    h = grouped_mm(xs, w13, offs)  # (T*k, 2I)
    a = silu_mul_scaled(h, weights.reshape(-1)[order].float())
    y = grouped_mm(a, w2, offs)  # (T*k, H), already weighted
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=order.device))  # pair -> row of y
    return combine(y, inv, k, shared, x.dtype)
