"""The Triton kernels of the whole-batch MoE (launched by :mod:`prfaas.model.moe_ops`,
:mod:`prfaas.model.moe_pairs` and :mod:`prfaas.model.moe_grouped`; defined only where Triton
imports). Each kernel's comment states its contract; the common layouts:

* x (T, H) token rows; a pair p = (token p // k, its choice p % k), P = T * k pairs;
* ``w13`` (E, 2I, H) each expert's stacked [gate | up] rows, ``w2`` (E, H, I) its down rows
  (nn.Linear layout: out features, in features), ``ws``: the shared expert in the same layout;
* sums and products in fp32, stored in the output's dtype.

Routing: :func:`router_logits_kernel`, :func:`route_topk_kernel`. The per-pair path (a few rows):
:func:`pair_gemv_kernel`, :func:`pair_gate_up_kernel`, :func:`pair_down_kernel`. The grouped path:
:func:`align_counts_kernel`, :func:`align_place_kernel` (pairs grouped by expert in padded row
blocks), :func:`fused_moe_kernel` (the grouped GEMM). Both paths: :func:`combine_kernel`.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def combine_kernel(
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
    def pair_gemv_kernel(
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
    def router_logits_kernel(
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
    def route_topk_kernel(
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
    def pair_gate_up_kernel(
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
    def pair_down_kernel(
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
    def align_counts_kernel(
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
    def align_place_kernel(ids_ptr, pstart_ptr, pairs_ptr, P, BP: tl.constexpr):
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
    def fused_moe_kernel(
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
