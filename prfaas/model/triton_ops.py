"""Small fused Triton kernels of the GPU path (the torch modules they replace are the reference).

* :func:`rms_norm` — RMSNorm, optionally fused with the residual add before it;
* :func:`rms_norm_gated` — KDA's output norm times a sigmoid gate;
* :func:`silu_mul` — SwiGLU's ``silu(gate) * up`` over the fused gate|up projection;
* :func:`conv_update` — one decode step of KDA's causal depthwise convolutions, reading and
  updating the per-request conv state in its cache slot in place (padding rows write nothing);
* :func:`causal_conv` — the same convolutions over a prefill chunk, reading the in-projection's
  strided output in place and writing q, k and v as contiguous planes (no copies before the
  chunked KDA kernels, which need contiguous inputs).

Each replaces several elementwise PyTorch kernels (and their fp32 round trips through memory) with
one. :func:`enabled` decides per tensor: CUDA tensors, Triton importable, ``PRFAAS_DISABLE_FLA``
unset. The tests run these kernels on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is present wherever there is a GPU (torch's CUDA wheels depend on it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = ["causal_conv", "conv_update", "enabled", "rms_norm", "rms_norm_gated", "silu_mul"]


def enabled(x: Tensor) -> bool:
    """True when the model uses the fused kernels for ``x``: a CUDA tensor, Triton importable, and
    the pure-PyTorch path not forced by ``PRFAAS_DISABLE_FLA``. (The kernels themselves also run
    on CPU tensors under Triton's interpreter; the tests call them directly that way.)"""
    disabled = os.environ.get("PRFAAS_DISABLE_FLA", "").strip() not in ("", "0")
    return x.is_cuda and triton is not None and not disabled


def _require() -> None:
    if triton is None:
        raise RuntimeError("the fused GPU kernels need Triton (pip install triton)")


def _rows(x: Tensor) -> Tensor:
    """x as (rows, last dim) with unit stride along the last dim (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        y_ptr,
        sum_ptr,
        stride_x,
        stride_r,
        D,
        eps,
        HAS_RES: tl.constexpr,
        ROUND_SUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        xf = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + cols, mask=m, other=0.0)
            # the sum in fp32, kept in x's dtype (the residual stream's), as the unfused add does
            xf = xf + r.to(tl.float32)
            if ROUND_SUM:  # a 16-bit residual stream: the norm reads the rounded sum
                xf = xf.to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
            tl.store(sum_ptr + row * D + cols, xf.to(sum_ptr.dtype.element_ty), mask=m)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (xf * rstd * w).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_gated_kernel(
        x_ptr, g_ptr, w_ptr, y_ptr, stride_x, stride_g, D, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        y = x * rstd * w * tl.sigmoid(g)
        tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(
        gu_ptr, y_ptr, scale_ptr, stride_gu, N_COLS, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N_COLS
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + N_COLS + cols, mask=m, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + row).to(tl.float32)
        tl.store(y_ptr + row * N_COLS + cols, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _conv_update_kernel(
        x_ptr,
        state_ptr,
        w_ptr,
        slot_ptr,
        valid_ptr,
        y_ptr,
        stride_x,
        stride_slot,
        C,
        PARTS,
        KERNEL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = ch < C
        slot = tl.load(slot_ptr + b).to(tl.int64)
        valid = tl.load(valid_ptr + b) != 0
        x = tl.load(x_ptr + b * stride_x + ch, mask=m, other=0.0)
        st = state_ptr + slot * stride_slot + ch * (KERNEL - 1)
        # y = sum_j w[:, j] * window[j], window = [state (KERNEL-1 oldest first), x]
        acc = x.to(tl.float32) * tl.load(w_ptr + ch * KERNEL + KERNEL - 1, mask=m).to(tl.float32)
        prev = tl.load(st, mask=m, other=0.0)
        for j in tl.static_range(KERNEL - 1):
            wj = tl.load(w_ptr + ch * KERNEL + j, mask=m).to(tl.float32)
            acc += prev.to(x.dtype).to(tl.float32) * wj
            if j + 1 < KERNEL - 1:
                nxt = tl.load(st + j + 1, mask=m, other=0.0)
                tl.store(st + j, nxt, mask=m & valid)
                prev = nxt
            else:
                tl.store(st + j, x.to(prev.dtype), mask=m & valid)
        y = acc * tl.sigmoid(acc)
        # output as PARTS contiguous (B, C / PARTS) planes: q, k and v come out contiguous
        width = C // PARTS
        dst = (ch // width) * (tl.num_programs(0) * width) + b * width + ch % width
        tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _causal_conv_kernel(
        x_ptr,
        state_ptr,
        w_ptr,
        y_ptr,
        fin_ptr,
        stride_xb,
        stride_xt,
        N,
        HAS_STATE: tl.constexpr,
        KERNEL: tl.constexpr,
        PARTS: tl.constexpr,
        WIDTH: tl.constexpr,
        BT: tl.constexpr,
        BC: tl.constexpr,
    ):
        # program (time tile, channel tile, sequence); a channel tile lies inside one plane, so
        # loads and stores stay contiguous along channels
        pt, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        C: tl.constexpr = PARTS * WIDTH
        plane = pc // (WIDTH // BC)
        inner = (pc % (WIDTH // BC)) * BC + tl.arange(0, BC)
        ch = plane * WIDTH + inner
        t = pt * BT + tl.arange(0, BT)
        tm = t < N
        xb = x_ptr + b * stride_xb
        sb = state_ptr + b * C * (KERNEL - 1)
        # y[t] = sum_j w[:, j] * input[t - (KERNEL-1) + j]; inputs before 0 come from the state
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        for j in tl.static_range(KERNEL):
            src = t - (KERNEL - 1) + j
            m = ((src >= 0) & (src < N))[:, None]
            xv = tl.load(
                xb + src[:, None].to(tl.int64) * stride_xt + ch[None, :], mask=m, other=0.0
            )
            xv = xv.to(tl.float32)
            if HAS_STATE:  # noqa: SIM102 (constexpr, then runtime: two ifs in Triton)
                if pt * BT < KERNEL - 1:  # only the first tile reaches back into the state
                    ms = ((src < 0) & tm)[:, None]
                    sv = tl.load(
                        sb + ch[None, :] * (KERNEL - 1) + (src[:, None] + KERNEL - 1), mask=ms
                    )
                    xv += tl.where(ms, sv.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
            acc += xv * tl.load(w_ptr + ch * KERNEL + j).to(tl.float32)[None, :]
        y = acc * tl.sigmoid(acc)
        dst = y_ptr + plane.to(tl.int64) * (tl.num_programs(2) * N * WIDTH)
        dst += (b * N + t.to(tl.int64))[:, None] * WIDTH + inner[None, :]
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=tm[:, None])
        if pt == tl.num_programs(0) - 1:  # the new state: the last KERNEL - 1 inputs
            for i in tl.static_range(KERNEL - 1):
                at = N - (KERNEL - 1) + i
                if at >= 0:
                    last = tl.load(xb + at * stride_xt + ch)
                elif HAS_STATE:
                    last = tl.load(sb + ch * (KERNEL - 1) + N + i).to(x_ptr.dtype.element_ty)
                else:
                    last = tl.zeros((BC,), dtype=x_ptr.dtype.element_ty)
                tl.store(fin_ptr + b * C * (KERNEL - 1) + ch * (KERNEL - 1) + i, last)


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(norm(s) * weight, s)`` with ``s = x + residual`` (or ``x``), over the last dim. The sum
    is computed in fp32 and has x's dtype (the residual stream's: fp32, or the model's 16-bit
    dtype, rounded to nearest even); the normalised output has ``out_dtype`` (default x's)."""
    _require()
    shape, D = x.shape, x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    else:
        r2, s = x2, x
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            y,
            s if residual is not None else y,
            x2.stride(0),
            r2.stride(0),
            D,
            eps,
            HAS_RES=residual is not None,
            ROUND_SUM=x.dtype != torch.float32,
            BLOCK=triton.next_power_of_2(D),
            num_warps=4 if D <= 4096 else 8,
        )
    return y.view(shape), (s.view(shape) if residual is not None else x)


def rms_norm_gated(x: Tensor, gate: Tensor, weight: Tensor, eps: float, out_dtype) -> Tensor:
    """``norm(x) * weight * sigmoid(gate)`` over the last dim (fp32 math), as ``out_dtype``."""
    _require()
    shape, D = x.shape, x.shape[-1]
    x2, g2 = _rows(x), _rows(gate)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_gated_kernel[(x2.shape[0],)](
            x2, g2, weight, y, x2.stride(0), g2.stride(0), D, eps, BLOCK=triton.next_power_of_2(D)
        )
    return y.view(shape)


def silu_mul(gate_up: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """``silu(gate) * up`` where the last dim of ``gate_up`` is ``[gate | up]``; times
    ``row_scale[r]`` (one value per row, computed in fp32) when given."""
    _require()
    shape = gate_up.shape
    n = shape[-1] // 2
    gu = _rows(gate_up)
    y = torch.empty((gu.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if gu.shape[0]:
        scale = row_scale.contiguous() if row_scale is not None else y
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](
            gu, y, scale, gu.stride(0), n, BLOCK=block, HAS_SCALE=row_scale is not None
        )
    return y.view(*shape[:-1], n)


def conv_update(
    x: Tensor, state: Tensor, weight: Tensor, slots: Tensor, valid: Tensor, parts: int
) -> Tensor:
    """One token of a causal depthwise conv with SiLU, per row, state kept in cache slots.

    x (B, C) the new inputs (rows may be strided); state (S, C, kernel-1) all slots, oldest input
    first, updated in place for rows with ``valid`` nonzero; weight (C, kernel); slots (B,).
    Returns (parts, B, C / parts): the C outputs split into ``parts`` contiguous planes."""
    _require()
    B, C = x.shape
    kernel = weight.shape[1]
    if state.shape[1:] != (C, kernel - 1) or state.stride(2) != 1 or state.stride(1) != kernel - 1:
        raise ValueError(f"conv state must be (slots, {C}, {kernel - 1}) row-major per slot")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((parts, B, C // parts), dtype=x.dtype, device=x.device)
    block = 256
    if B:
        _conv_update_kernel[(B, triton.cdiv(C, block))](
            x,
            state,
            weight.contiguous(),
            slots,
            valid,
            y,
            x.stride(0),
            state.stride(0),
            C,
            parts,
            KERNEL=kernel,
            BLOCK=block,
        )
    return y


def causal_conv(
    x: Tensor, weight: Tensor, state: Tensor | None, parts: int
) -> tuple[Tensor, Tensor]:
    """A causal depthwise conv with SiLU over a chunk, carrying state.

    x (B, n, C), unit stride along C (rows may be strided: a slice of a wider projection);
    weight (C, kernel); state (B, C, kernel-1), the previous inputs oldest first (None: zeros).
    Returns ``(y, new_state)``: y (parts, B, n, C / parts), the outputs as contiguous planes, and
    new_state (B, C, kernel-1), the chunk's last inputs (in x's dtype)."""
    _require()
    B, n, C = x.shape
    kernel = weight.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    if state is not None:
        if state.shape != (B, C, kernel - 1):
            raise ValueError(
                f"conv state must be ({B}, {C}, {kernel - 1}), got {tuple(state.shape)}"
            )
        state = state.contiguous()
    width = C // parts
    if width * parts != C:
        raise ValueError(f"{C} channels do not split into {parts} planes")
    y = torch.empty((parts, B, n, width), dtype=x.dtype, device=x.device)
    fin = torch.empty((B, C, kernel - 1), dtype=x.dtype, device=x.device)
    bc = 128
    while width % bc:  # a channel tile must not straddle two planes
        bc //= 2
    bt = max(16, 4096 // bc)
    if B and n:
        _causal_conv_kernel[(triton.cdiv(n, bt), C // bc, B)](
            x,
            state if state is not None else fin,
            weight.contiguous(),
            y,
            fin,
            x.stride(0),
            x.stride(1),
            n,
            HAS_STATE=state is not None,
            KERNEL=kernel,
            PARTS=parts,
            WIDTH=width,
            BT=bt,
            BC=bc,
            num_warps=4,
        )
    return y, fin
