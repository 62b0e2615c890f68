"""Paged MLA decode attention over the compressed latent cache (a Triton kernel plus a reference).

MLA in its absorbed form is multi-query attention in latent space: every head of a sequence attends
over the same per-token latent ``[c (R) | k_pe (P)]`` with keys ``c``/``k_pe`` and values ``c``.
For one decode query per sequence this computes, per row ``b`` and head ``h``::

    o_lat[b, h] = softmax(scale * (q_lat[b, h] . c[t] + q_pe[b, h] . k_pe[t]), t < lengths[b]) @ c

reading the latents straight from the paged cache (``row = block_tables[b, t // bs] * bs + t % bs``).
The kernel runs one program per (head group, KV split, row): all heads of a group form the M
dimension of ``tl.dot`` (padded to >= 16), so each latent tile is loaded once for all of them, and
the context is walked in tiles of ``BLOCK_N`` tokens with an fp32 online softmax. Long contexts with
small batches are split over the context (flash-decoding); a second small kernel merges the splits
by their log-sum-exp. The grid depends on shapes only (``NB * block_size`` bounds the context, the
per-row lengths are read on the device), so the call is CUDA-graph capturable.

``paged_mla_decode_ref`` is a pure-PyTorch reference with the same signature (gather + masked
softmax, the same dtype handling as ``MLAAttention.attend_absorbed``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:  # triton is optional: CPU-only installs and tests without it still import this module
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as e:  # ImportError, or triton failing to initialise
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = e

__all__ = [
    "mla_decode_num_splits",
    "paged_mla_decode",
    "paged_mla_decode_ref",
    "triton_available",
]

MAX_SPLITS = 64  # upper bound on KV splits per row chosen by the heuristic
MIN_TOKENS_PER_SPLIT = 128  # the heuristic does not cut the context bound into smaller pieces


def triton_available() -> bool:
    """True when triton imported (the kernel itself may still need a GPU or TRITON_INTERPRET=1)."""
    return triton is not None


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def paged_mla_decode_ref(
    q_lat: Tensor,
    q_pe: Tensor,
    cache: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    block_size: int,
    scale: float,
    *,
    num_splits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pure-PyTorch paged MLA decode: gathers each row's latents (NB * block_size, padded) and runs
    a masked softmax. Same arguments and result as ``paged_mla_decode`` (``num_splits`` is ignored).

    q_lat (B, H, R), q_pe (B, H, P), cache (rows, R + P), block_tables (B, NB), lengths (B,).
    Returns o_lat (B, H, R) in ``out_dtype``."""
    del num_splits
    B, H, R = q_lat.shape
    P = cache.shape[-1] - R
    dt = cache.dtype  # products read the cache in its own dtype, fp32 accumulation
    arange = torch.arange(block_size, device=cache.device)
    rows = (block_tables.long()[:, :, None] * block_size + arange).reshape(B, -1)  # (B, L)
    lat = cache[rows]  # (B, L, R + P)
    c, k_pe = lat.split([R, P], -1)
    s = torch.matmul(q_lat.to(dt), c.transpose(1, 2)).float()  # (B, H, L)
    if P:
        s = s + torch.matmul(q_pe.to(dt), k_pe.transpose(1, 2)).float()
    s = s * scale
    valid = torch.arange(rows.shape[1], device=cache.device)[None, :] < lengths[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    return torch.matmul(p.to(dt), c).float().to(out_dtype)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_h(H: int, R: int) -> int:
    """Heads per program: >= 16 (the smallest tl.dot M), at most 64, and the fp32 accumulator
    BLOCK_H x R capped at 8192 values (64 registers a thread at 4 warps)."""
    return max(16, min(_next_pow2(H), 64, max(16, 8192 // _next_pow2(R))))


def _config(R: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for latent rank R and cache dtype.

    R = 512 (576 values a token): a 32-token tile is 32 KiB of c plus 4 KiB of k_pe in bf16.
    The block-table load is one level of indirection in front of the tile load, and Triton 3.6's
    pipeliner spends stages on it: num_stages 2-4 give a single tile buffer that is waited on
    right after it is issued (no overlap); 5 gives two tile buffers with the next tile in flight
    while this one is used. Compiled for sm_90 that is ~92 KiB of shared memory (2 x 36 KiB
    tiles + q 16 x 576 + scratch) and ~206 registers a thread at 4 warps, no spills: two programs
    per H100 SM. Smaller ranks take 64-token tiles. An fp32 cache (exact fp32 dots on FMA units:
    for tests, not for speed) takes 16/32-token tiles at 8 warps, which compile without spills
    (R = 512: ~110 KiB shared memory, ~92 registers)."""
    if dtype == torch.float32:
        return (16 if R >= 256 else 32), 8, 5
    return (32 if R >= 256 else 64), 4, 5


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any value; only shapes the heuristic


def mla_decode_num_splits(
    batch: int, num_heads: int, max_len: int, num_sms: int, rank: int = 512
) -> int:
    """KV splits per row from shapes only (graph-safe).

    ``floor(num_sms / programs)`` with programs = rows x head groups: split only while the
    split grid still fits one program per SM. A double-buffered program keeps its SM's loads in
    flight, and each split costs traffic (it writes and the merge re-reads H x R fp32 partials,
    ~11% extra at H=16, R=512, 1024 tokens, 2 splits), so e.g. B=128, H=16 on a 132-SM H100 is
    not split, B=64 takes 2 and B=1 many. No piece of the context bound is shorter than
    ``MIN_TOKENS_PER_SPLIT``, at most ``MAX_SPLITS``. ``max_len`` is the bound NB * block_size;
    inside the kernel each row's actual length is cut evenly (rounded up to BLOCK_N), so splits
    past a short row's end exit at once."""
    programs = max(1, batch) * _cdiv(num_heads, _block_h(num_heads, rank))
    s = num_sms // programs
    s = min(s, _cdiv(max_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    return max(1, s)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mla_decode_kernel(
        Q,  # (B, H, R)
        QPE,  # (B, H, P)
        Cache,  # (rows, R + P)
        BT,  # (B, NB)
        Lens,  # (B,)
        Out,  # (B, H, R) when NUM_SPLITS == 1, else fp32 (B, S, H, R)
        Lse,  # fp32 (B, S, H) log2-sum-exp2 of each split (unused when NUM_SPLITS == 1)
        stride_qb,
        stride_qh,
        stride_pb,
        stride_ph,
        stride_cr,
        stride_btb,
        stride_ob,
        stride_os,
        stride_oh,
        stride_lb,
        stride_ls,
        H,
        NB,
        qk_scale,  # scale * log2(e)
        R: tl.constexpr,
        P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        hg = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)

        length = tl.minimum(tl.load(Lens + b).to(tl.int32), NB * PAGE)
        if NUM_SPLITS == 1:
            start = 0
            end = length
        else:
            chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
            start = split * chunk
            end = tl.minimum(start + chunk, length)

        offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_n0 = tl.arange(0, BLOCK_N)
        cdt = Cache.dtype.element_ty

        q = tl.load(
            Q + b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :],
            mask=mask_h[:, None] & mask_r[None, :],
            other=0.0,
        ).to(cdt)
        if P > 0:
            offs_p = tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            q_pe = tl.load(
                QPE + b * stride_pb + offs_h[:, None] * stride_ph + offs_p[None, :],
                mask=mask_h[:, None] & mask_p[None, :],
                other=0.0,
            ).to(cdt)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        bt_row = BT + b * stride_btb

        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            mask_n = offs_n < end
            blk = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
            row_ptr = Cache + (blk * PAGE + offs_n % PAGE) * stride_cr  # (BLOCK_N,) pointers
            # (BLOCK_N, BLOCK_R): one read serves the scores and the values of every head
            if BLOCK_R == R:  # no mask along the row: keeps the loads vectorised
                c = tl.load(row_ptr[:, None] + offs_r[None, :], mask=mask_n[:, None], other=0.0)
            else:
                c = tl.load(
                    row_ptr[:, None] + offs_r[None, :],
                    mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0,
                )
            s = tl.dot(q, tl.trans(c), input_precision="ieee")
            if P > 0:
                if BLOCK_P == P:
                    k_pe = tl.load(
                        row_ptr[:, None] + R + offs_p[None, :], mask=mask_n[:, None], other=0.0
                    )
                else:
                    k_pe = tl.load(
                        row_ptr[:, None] + R + offs_p[None, :],
                        mask=mask_n[:, None] & mask_p[None, :],
                        other=0.0,
                    )
                s += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(cdt), c, input_precision="ieee")
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty range (length 0) gives zeros, not NaN
        o = acc / l_safe[:, None]
        out_ptr = (
            Out + b * stride_ob + split * stride_os + offs_h[:, None] * stride_oh + offs_r[None, :]
        )
        if NUM_SPLITS == 1:
            tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])
        else:
            nonempty = start < end  # empty splits write nothing; the merge skips them
            tl.store(out_ptr, o, mask=mask_h[:, None] & mask_r[None, :] & nonempty)
            tl.store(
                Lse + b * stride_lb + split * stride_ls + offs_h,
                m_i + tl.log2(l_safe),
                mask=mask_h & nonempty,
            )

    @triton.jit
    def _mla_merge_kernel(
        Part,  # fp32 (B, S, H, R)
        Lse,  # fp32 (B, S, H)
        Lens,  # (B,)
        Out,  # (B, H, R)
        stride_pb,
        stride_ps,
        stride_ph,
        stride_lb,
        stride_ls,
        stride_ob,
        stride_oh,
        NB,
        R: tl.constexpr,
        BLOCK_RR: tl.constexpr,  # the slice of R this program merges
        BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS): all splits in one tile, no serial loop
        BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        h = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rb = tl.program_id(2)
        length = tl.minimum(tl.load(Lens + b).to(tl.int32), NB * PAGE)
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
        n_active = tl.cdiv(length, tl.maximum(chunk, 1))  # the splits the main kernel wrote
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < n_active
        offs_r = rb * BLOCK_RR + tl.arange(0, BLOCK_RR)
        mask_r = offs_r < R
        lse = tl.load(
            Lse + b * stride_lb + offs_s * stride_ls + h, mask=mask_s, other=float("-inf")
        )
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # length 0: no split wrote, all weights 0
        w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
        part = tl.load(
            Part + b * stride_pb + offs_s[:, None] * stride_ps + h * stride_ph + offs_r[None, :],
            mask=mask_s[:, None] & mask_r[None, :],
            other=0.0,
        )
        den = tl.sum(w, 0)
        den = tl.where(den > 0.0, den, 1.0)
        o = tl.sum(part * w[:, None], 0) / den
        tl.store(
            Out + b * stride_ob + h * stride_oh + offs_r, o.to(Out.dtype.element_ty), mask=mask_r
        )


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------


def paged_mla_decode(
    q_lat: Tensor,
    q_pe: Tensor,
    cache: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    block_size: int,
    scale: float,
    *,
    num_splits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """Paged MLA decode attention (Triton). One query per row over its cached latents.

    q_lat (B, H, R): absorbed no-rope query; q_pe (B, H, P): rope query (P may be 0);
    cache (rows, R + P): flat paged latent cache, row = block * block_size + offset, each row
    ``[c | k_pe]``; block_tables (B, NB) int32/int64; lengths (B,) int, positions >= length (and
    >= NB * block_size) are ignored (a row of length 0 gets zeros). ``num_splits`` forces the KV split count (default: the
    shape-only heuristic ``mla_decode_num_splits``); ``block_n`` (a power of two >= 16),
    ``num_warps`` and ``num_stages`` override the launch config of ``_config`` (for tuning).
    Returns o_lat (B, H, R) in ``out_dtype``.
    No host synchronisation: capturable in a CUDA graph."""
    if triton is None:
        raise RuntimeError(
            f"paged_mla_decode needs triton, which failed to import ({_TRITON_IMPORT_ERROR!r}); "
            "use paged_mla_decode_ref instead"
        )
    B, H, R = q_lat.shape
    P = cache.shape[-1] - R
    NB = block_tables.shape[1]
    if P < 0 or (P > 0 and tuple(q_pe.shape) != (B, H, P)):
        raise ValueError(
            f"cache width {cache.shape[-1]} does not match q_lat {q_lat.shape} / q_pe {q_pe.shape}"
        )
    if B > 65535:
        raise ValueError("paged_mla_decode: batch above 65535 exceeds the grid")
    if q_lat.stride(-1) != 1:
        q_lat = q_lat.contiguous()
    if P and q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if cache.stride(-1) != 1:
        raise ValueError("paged_mla_decode: the cache's last dimension must be contiguous")
    if not P:
        q_pe = q_lat  # never read; any pointer with the right strides
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()

    cfg_n, cfg_warps, cfg_stages = _config(R, cache.dtype)
    BLOCK_N = block_n or cfg_n
    num_warps = num_warps or cfg_warps
    num_stages = num_stages or cfg_stages
    BLOCK_H = _block_h(H, R)
    BLOCK_R = _next_pow2(R)
    BLOCK_P = max(16, _next_pow2(P)) if P else 16
    n_hg = _cdiv(H, BLOCK_H)
    S = (
        num_splits
        if num_splits is not None
        else mla_decode_num_splits(B, H, NB * block_size, _num_sms(cache.device), R)
    )
    S = max(1, int(S))

    out = torch.empty(B, H, R, device=q_lat.device, dtype=out_dtype)
    if S == 1:
        part, lse = out, out  # lse unused
        sp = (out.stride(0), 0, out.stride(1))
        sl = (0, 0)
    else:
        part = torch.empty(B, S, H, R, device=q_lat.device, dtype=torch.float32)
        lse = torch.empty(B, S, H, device=q_lat.device, dtype=torch.float32)
        sp = (part.stride(0), part.stride(1), part.stride(2))
        sl = (lse.stride(0), lse.stride(1))

    _mla_decode_kernel[(n_hg, S, B)](
        q_lat,
        q_pe,
        cache,
        block_tables,
        lengths,
        part,
        lse,
        q_lat.stride(0),
        q_lat.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        cache.stride(0),
        block_tables.stride(0),
        *sp,
        *sl,
        H,
        NB,
        float(scale) * 1.4426950408889634,
        R=R,
        P=P,
        BLOCK_R=BLOCK_R,
        BLOCK_P=BLOCK_P,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        PAGE=block_size,
        NUM_SPLITS=S,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if S > 1:
        BLOCK_S = _next_pow2(S)
        BLOCK_RR = min(BLOCK_R, max(16, 4096 // BLOCK_S))
        _mla_merge_kernel[(H, B, _cdiv(R, BLOCK_RR))](
            part,
            lse,
            lengths,
            out,
            *sp,
            *sl,
            out.stride(0),
            out.stride(1),
            NB,
            R=R,
            BLOCK_RR=BLOCK_RR,
            BLOCK_S=BLOCK_S,
            BLOCK_N=BLOCK_N,
            PAGE=block_size,
            NUM_SPLITS=S,
            num_warps=4,
        )
    return out
