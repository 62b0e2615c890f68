"""The routed-expert MoE as a few whole-batch kernels, with no host synchronisation (so a decode
step that runs it can be captured in a CUDA graph).

Contract of :func:`experts_forward` with :func:`route` (the same function as ``SparseMoE``'s
reference loop, which stays the readable version):

1. routing (:func:`route`): ``scores = sigmoid(x W_gate^T)`` in fp32; the experts are the top-k of
   ``scores + e_score_correction_bias`` (the bias chooses, it does not weight), largest first; the
   weights are the chosen *scores*, renormalised to sum 1 (optional) and times
   ``routed_scaling_factor``. On CUDA two Triton kernels (logits, then a per-token top-k);
2. the experts: ``sum_j weight_j * w2_e (silu(w1_e x) * w3_e x)`` over each token's k experts
   ``e``, with ``w13`` (E, 2I, H) the stacked [w1 | w3] and ``w2`` (E, H, I), plus the shared
   experts, summed in fp32, returned in x's dtype. On CUDA, by size (pairs = tokens * k):

   * at most ``SMALL_PAIRS``: :func:`pair_experts`, two Triton kernels and no permutation (one
     streams each pair's gate and up rows with SiLU and the weight in its epilogue, the shared
     expert as one more pair; one streams each token's down rows and sums);
   * up to ``TRITON_MAX_PAIRS``: :func:`align_blocks` (each expert's pairs padded to whole row
     blocks on the device) and :func:`fused_experts`, a Triton grouped GEMM that gathers its
     rows inside the kernel, twice, then :func:`combine`;
   * above: a stable sort of the pairs by expert, group ends by ``searchsorted``,
     ``torch._grouped_mm`` (CUTLASS, bf16 on Hopper) for gate|up and for down, the inverse
     permutation and :func:`combine` (one deterministic gather, no atomics).

   Elsewhere (CPU) the sort path with :func:`grouped_mm_reference`, a loop over the groups that
   reads the group ends on the host. The block sizes were tuned on an H200
   (benchmarks/gpu_tune_moe.py, benchmarks/results/moe_tune_h200.md).
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

    @triton.jit
    def _router_logits_kernel(
        x_ptr, w_ptr, out_ptr, stride_x, E, H: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr
    ):
        # out[t, e] = sum_h x[t, h] * w[e, h], fp32 products and sums (w fp32, x any float)
        t = tl.program_id(0).to(tl.int64)
        e = tl.program_id(1) * BE + tl.arange(0, BE)
        em = e < E
        rows = w_ptr + e[:, None].to(tl.int64) * H
        acc = tl.zeros((BE, BK), dtype=tl.float32)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < H
            xv = tl.load(x_ptr + t * stride_x + kk, mask=km, other=0.0).to(tl.float32)
            wv = tl.load(rows + kk[None, :], mask=em[:, None] & km[None, :], other=0.0)
            acc += wv.to(tl.float32) * xv[None, :]
        tl.store(out_ptr + t * E + e, tl.sum(acc, axis=1), mask=em)

    @triton.jit
    def _route_topk_kernel(
        logit_ptr,
        bias_ptr,
        w_ptr,
        idx_ptr,
        E,
        scaling,
        K: tl.constexpr,
        KP: tl.constexpr,
        RENORM: tl.constexpr,
        BE: tl.constexpr,
    ):
        # one token: scores = sigmoid(logits); the K largest of scores + bias, largest first (the
        # lowest index among equal ones); their scores, renormalised, times scaling
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BE)
        em = e < E
        s = tl.sigmoid(tl.load(logit_ptr + t * E + e, mask=em, other=0.0))
        c = tl.where(em, s + tl.load(bias_ptr + e, mask=em, other=0.0), float("-inf"))
        j = tl.arange(0, KP)
        sel = tl.zeros((KP,), dtype=tl.int32)
        ws = tl.zeros((KP,), dtype=tl.float32)
        for i in tl.static_range(K):
            best = tl.max(c, axis=0)
            pick = tl.min(tl.where(c == best, e, BE), axis=0)
            sel = tl.where(j == i, pick, sel)
            ws = tl.where(j == i, tl.sum(tl.where(e == pick, s, 0.0), axis=0), ws)
            c = tl.where(e == pick, float("-inf"), c)
        if RENORM:
            ws = ws / (tl.sum(ws, axis=0) + 1e-20)
        jm = j < K
        tl.store(w_ptr + t * K + j, ws * scaling, mask=jm)
        tl.store(idx_ptr + t * K + j, sel.to(tl.int64), mask=jm)

    @triton.jit
    def _pair_gate_up_kernel(
        x_ptr,
        ids_ptr,
        scale_ptr,
        w_ptr,
        ws_ptr,
        a_ptr,
        P,
        INTER: tl.constexpr,
        H: tl.constexpr,
        DIV: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        # a[p, n] = silu(g) * u * scale[p] with g, u = rows n and INTER + n of w13[ids[p]] times
        # x[p // DIV]; programs p >= P: the shared expert (ws, the same layout) on token p - P
        p = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = n < INTER
        routed = p < P
        q = tl.minimum(p, P - 1)
        e = tl.load(ids_ptr + q).to(tl.int64)
        s = tl.where(routed, tl.load(scale_ptr + q).to(tl.float32), 1.0)
        row = tl.where(routed, p // DIV, p - P).to(tl.int64)
        if routed:
            base = w_ptr + e * (2 * INTER * H)
        else:
            base = ws_ptr + 0
        g_rows = base + n[:, None].to(tl.int64) * H
        u_rows = g_rows + INTER * H
        acc_g = tl.zeros((BN, BK), dtype=tl.float32)
        acc_u = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < H
            m = nm[:, None] & km[None, :]
            xv = tl.load(x_ptr + row * H + kk, mask=km, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(g_rows + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
            acc_u += tl.load(u_rows + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        y = g * tl.sigmoid(g) * u * s
        tl.store(a_ptr + p.to(tl.int64) * INTER + n, y.to(a_ptr.dtype.element_ty), mask=nm)

    @triton.jit
    def _pair_down_kernel(
        a_ptr,
        ids_ptr,
        w_ptr,
        ws_ptr,
        out_ptr,
        P,
        H,
        INTER: tl.constexpr,
        KTOP: tl.constexpr,
        HAS_SHARED: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        # out[t, n] = sum_j w2[ids[t*KTOP + j], n] . a[t*KTOP + j] (+ ws[n] . a[P + t]), summed in
        # fp32 in one pass: the k choices and the shared expert of token t
        t = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = n < H
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for j in tl.static_range(KTOP + HAS_SHARED):
            if j < KTOP:
                e = tl.load(ids_ptr + t * KTOP + j).to(tl.int64)
                rows = w_ptr + e * H * INTER + n[:, None].to(tl.int64) * INTER
                arow = a_ptr + (t * KTOP + j) * INTER
            else:
                rows = ws_ptr + n[:, None].to(tl.int64) * INTER
                arow = a_ptr + (P + t) * INTER
            for k0 in range(0, INTER, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < INTER
                av = tl.load(arow + kk, mask=km, other=0.0).to(tl.float32)[None, :]
                wv = tl.load(rows + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
                acc += wv.to(tl.float32) * av
        tl.store(out_ptr + t * H + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=nm)

    @triton.jit
    def _align_counts_kernel(
        ids_ptr,
        pstart_ptr,
        be_ptr,
        pairs_ptr,
        P,
        NB,
        E: tl.constexpr,
        BE: tl.constexpr,
        BM: tl.constexpr,
        BP: tl.constexpr,
        BF: tl.constexpr,
    ):
        # one program: pairs per expert, padded to whole BM blocks; each expert's padded start;
        # the expert of each block (-1 past the last); pairs[:] = P (padding, overwritten next)
        e = tl.arange(0, BE)
        counts = tl.zeros((BE,), dtype=tl.int32)
        # (while loops: Triton's interpreter, which the CPU tests use, takes no runtime range)
        p0 = 0
        while p0 < P:
            p = p0 + tl.arange(0, BP)
            ids = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.int32)
            counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
            p0 += BP
        padded = (counts + BM - 1) // BM * BM
        pend = tl.cumsum(padded, axis=0)
        tl.store(pstart_ptr + e, pend - padded, mask=e < E)
        b0 = 0
        while b0 < NB:
            b = b0 + tl.arange(0, BP)
            owner = tl.sum((pend[None, :] <= (b * BM)[:, None]).to(tl.int32), axis=1)
            tl.store(be_ptr + b, tl.where(owner < E, owner, -1), mask=b < NB)
            b0 += BP
        q0 = 0
        while q0 < NB * BM:  # wide stores: one program writes all of pairs
            q = q0 + tl.arange(0, BF)
            tl.store(pairs_ptr + q, tl.zeros((BF,), dtype=tl.int64) + P, mask=q < NB * BM)
            q0 += BF

    @triton.jit
    def _align_place_kernel(ids_ptr, pstart_ptr, pairs_ptr, P, BP: tl.constexpr):
        # pairs[pstart[e] + rank] = p, rank = the pairs before p with p's expert e (a stable
        # counting sort: the order torch.sort(stable=True) gives)
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        pm = p < P
        ids = tl.load(ids_ptr + p, mask=pm, other=-1).to(tl.int32)
        rank = tl.zeros((BP,), dtype=tl.int32)
        q0 = 0
        while q0 <= tl.program_id(0) * BP:
            q = q0 + tl.arange(0, BP)
            idq = tl.load(ids_ptr + q, mask=q < P, other=-2).to(tl.int32)
            before = (idq[None, :] == ids[:, None]) & (q[None, :] < p[:, None])
            rank += tl.sum(before.to(tl.int32), axis=1)
            q0 += BP
        start = tl.load(pstart_ptr + ids, mask=pm, other=0)
        tl.store(pairs_ptr + start + rank, p.to(tl.int64), mask=pm)

    @triton.jit
    def _fused_moe_kernel(
        a_ptr,
        w_ptr,
        out_ptr,
        scale_ptr,
        pairs_ptr,
        block_expert_ptr,
        P,
        N,
        K: tl.constexpr,
        DIV: tl.constexpr,
        GATE_UP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        # one (BM rows, BN columns) tile of a grouped GEMM whose rows are gathered on the fly:
        # block pid_m holds pairs[pid_m*BM : +BM] (P: padding), all of expert block_expert[pid_m]
        # (-1: past the last block, nothing to do); row of pair p in a: p // DIV. GATE_UP: w is
        # (E, 2N, K) = [gate | up]; out[p, n] = silu(gate) * up * scale[p]; else out[p, n] = a . w
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e >= 0:
            rm = pid_m * BM + tl.arange(0, BM)
            pair = tl.load(pairs_ptr + rm)
            valid = pair < P
            arow = (pair // DIV).to(tl.int64)
            n = pid_n * BN + tl.arange(0, BN)
            nm = n < N
            kk = tl.arange(0, BK)
            a_ptrs = a_ptr + arow[:, None] * K + kk[None, :]
            wn = 2 * N if GATE_UP else N
            b_ptrs = w_ptr + e * wn * K + n[None, :].to(tl.int64) * K + kk[:, None]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                km = (k0 + kk) < K
                av = tl.load(a_ptrs, mask=valid[:, None] & km[None, :], other=0.0)
                bv = tl.load(b_ptrs, mask=km[:, None] & nm[None, :], other=0.0)
                acc = tl.dot(av, bv, acc)
                if GATE_UP:
                    bu = tl.load(b_ptrs + N * K, mask=km[:, None] & nm[None, :], other=0.0)
                    acc2 = tl.dot(av, bu, acc2)
                a_ptrs += BK
                b_ptrs += BK
            if GATE_UP:
                sc = tl.load(scale_ptr + pair, mask=valid, other=0.0).to(tl.float32)
                acc = acc * tl.sigmoid(acc) * acc2 * sc[:, None]
            o_ptrs = out_ptr + pair[:, None].to(tl.int64) * N + n[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & nm[None, :])


ROUTER_GEMV_ROWS = 64  # at most this many tokens: the router's logits by a Triton GEMV
# _router_logits_kernel's blocks (tuned on an H200, benchmarks/results/moe_tune_h200.json)
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
            _router_logits_kernel[(T, triton.cdiv(E, c["BE"]))](
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
        _route_topk_kernel[(T,)](
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
            _pair_gemv_kernel[(P, triton.cdiv(N, bn))](
                x, ids, w, y, N, K=K, DIV=div, BN=bn, BK=bk, num_warps=4
            )
        return y
    rows = torch.arange(P, device=x.device) // div
    return torch.bmm(w[ids].to(x.dtype), x[rows][:, :, None])[:, :, 0]


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


def _fusable_shared(shared_weights, w13: Tensor, w2: Tensor) -> bool:
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
    """:func:`experts_forward` for a few rows on CUDA, no permutation, two Triton kernels: one
    program per (pair, BN rows of the expert's gate and up) computes ``silu(gate) * up * weight``
    (the shared expert as one more pair per token, weight 1); one program per (token, BN output
    columns) streams the down rows of its k experts and the shared one and writes the sum.
    ``shared_weights`` must pass :func:`_fusable_shared` (or be None)."""
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
    _pair_gate_up_kernel[(rows, triton.cdiv(inter, cg["BN"]))](
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
    _pair_down_kernel[(T, triton.cdiv(H, cd["BN"]))](
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


# the grouped GEMMs of the permuted path: "auto" (the Triton grouped GEMM of
# :func:`fused_experts` up to TRITON_MAX_PAIRS pairs, ``torch._grouped_mm`` above), "triton" or
# "grouped_mm". On an H200 (benchmarks/results/moe_tune_h200.json, one MoE layer of the 48B
# geometry): 256 pairs 0.57 vs 0.83 ms, 1024 pairs 0.91 vs 1.26 ms, 8192 pairs 1.19 vs 1.34 ms,
# 65536 pairs 2.71 vs 2.35 ms.
GROUPED_IMPL = "auto"
TRITON_MAX_PAIRS = 8192
# fused_experts' tiles by pair count: (pairs at most, {BM, BN, BK, num_warps, num_stages})
FUSED_CONFIGS = [
    (2048, {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3}),
    (16384, {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4}),
    (1 << 62, {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}),
]


def use_triton_grouped(pairs: int) -> bool:
    """Whether the permuted path of ``pairs`` (token, expert) pairs runs :func:`fused_experts`."""
    if GROUPED_IMPL == "auto":
        return pairs <= TRITON_MAX_PAIRS
    return GROUPED_IMPL == "triton"


# align_blocks by two Triton kernels up to this many pairs (the counting sort's last program
# scans all pairs before it: at 8192 pairs slower than torch's sort; the Triton grouped path per
# layer on an H200: 256 pairs 0.525 vs 0.574 ms, 1024 pairs 0.876 vs 0.908 ms with the kernels)
ALIGN_KERNEL_MAX_PAIRS = 2048


def align_blocks(idx: Tensor, num_experts: int, bm: int) -> tuple[Tensor, Tensor]:
    """Expert ids (T, k) -> (pairs (NB*bm,): the flat pair indices grouped by expert, each group
    padded to a multiple of ``bm`` with the value T*k; block_expert (NB,): the expert of each
    block of ``bm`` rows, -1 past the last). NB = ceil(T*k / bm) + E bounds the blocks from the
    shapes alone (no host sync). On CUDA up to ``ALIGN_KERNEL_MAX_PAIRS`` pairs: two Triton
    kernels (counts, padded starts and block owners in one program; a stable counting sort);
    elsewhere torch ops (a stable sort, searchsorted, a scatter)."""
    flat = idx.reshape(-1)
    P, dev = flat.numel(), flat.device
    nb = -(-P // bm) + num_experts
    if triton_ops.enabled(flat) and P <= ALIGN_KERNEL_MAX_PAIRS:  # two kernels instead of ~15
        pairs = torch.empty(nb * bm, dtype=torch.int64, device=dev)
        be = torch.empty(nb, dtype=torch.int32, device=dev)
        pstart = torch.empty(num_experts, dtype=torch.int32, device=dev)
        if P:
            ids = flat.contiguous()
            _align_counts_kernel[(1,)](
                ids, pstart, be, pairs, P, nb, E=num_experts,
                BE=triton.next_power_of_2(num_experts), BM=bm, BP=64, BF=1024,
            )  # fmt: skip
            _align_place_kernel[(triton.cdiv(P, 64),)](ids, pstart, pairs, P, BP=64)
        else:
            pairs.fill_(0)
            be.fill_(-1)
        return pairs, be
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=dev, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, bounds, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + bm - 1) // bm * bm
    pend = torch.cumsum(padded, 0)
    shift = (pend - padded) - (ends - counts)  # padded start - start, per expert
    pos = torch.arange(P, device=dev) + shift[sorted_ids]
    pairs = torch.full((nb * bm,), P, dtype=torch.int64, device=dev)
    pairs.scatter_(0, pos, order)
    be = torch.searchsorted(pend, torch.arange(nb, device=dev, dtype=pend.dtype) * bm, right=True)
    return pairs, torch.where(be < num_experts, be, -1)


def fused_experts(
    x: Tensor, weights: Tensor, idx: Tensor, w13: Tensor, w2: Tensor, config: dict | None = None
) -> Tensor:
    """The routed experts' weighted outputs in pair order, (T*k, H), by two Triton grouped GEMMs
    over :func:`align_blocks`' blocks: gate|up with the rows of x gathered in the kernel and
    ``silu(gate) * up * weight`` in its epilogue, then down, each pair's row written in place."""
    T, k = idx.shape
    P, H, inter = T * k, x.shape[1], w2.shape[2]
    c = config or next(c for n, c in FUSED_CONFIGS if n >= P)
    pairs, be = align_blocks(idx, w13.shape[0], c["BM"])
    nb = be.shape[0]
    x = x.contiguous()
    scale = weights.reshape(-1).float().contiguous()
    a = torch.empty(P, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(P, H, dtype=x.dtype, device=x.device)
    opts = {key: c[key] for key in ("BM", "BN", "BK", "num_warps", "num_stages")}
    _fused_moe_kernel[(nb, triton.cdiv(inter, c["BN"]))](
        x, w13, a, scale, pairs, be, P, inter, H, DIV=k, GATE_UP=True, **opts
    )
    _fused_moe_kernel[(nb, triton.cdiv(H, c["BN"]))](
        a, w2, y, scale, pairs, be, P, H, inter, DIV=1, GATE_UP=False, **opts
    )
    return y


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
        and (shared_weights is None or _fusable_shared(shared_weights, w13, w2))
    ):  # decode of a few rows: no permutation
        return pair_experts(x, weights, idx, w13, w2, shared_weights)
    if shared is None and shared_weights is not None:
        shared = shared_mlp(x, *shared_weights)
    if small:
        ids = idx.reshape(-1)
        h = pair_gemv(x, ids, w13, div=k)  # (T*k, 2I) in pair order
        a = silu_mul_scaled(h, weights.reshape(-1).float())
        return combine(pair_gemv(a, ids, w2, div=1), None, k, shared, x.dtype)
    if triton_ops.enabled(x) and use_triton_grouped(T * k):
        return combine(fused_experts(x, weights, idx, w13, w2), None, k, shared, x.dtype)
    order, offs = permute(idx, w13.shape[0])
    xs = x[order // k]  # (T*k, H) the pairs' inputs, grouped by expert
    h = grouped_mm(xs, w13, offs)  # (T*k, 2I)
    a = silu_mul_scaled(h, weights.reshape(-1)[order].float())
    y = grouped_mm(a, w2, offs)  # (T*k, H), already weighted
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=order.device))  # pair -> row of y
    return combine(y, inv, k, shared, x.dtype)
