"""Kimi Delta Attention (KDA) kernels: chunked (WY/UT) and recurrent torch paths, fla dispatch.

Layouts are batch-first and fla-compatible: q, k (B, T, H, K); v (B, T, H, V); g (B, T, H, K)
log-space per-channel decay (<= 0); beta (B, T, H); state (B, H, K, V) fp32.

Per token and head: ``S <- diag(exp(g_t)) S``; ``S <- S + beta_t k_t (v_t - k_t^T S)^T``;
``o_t = scale * q_t^T S``.

The torch paths are for inference (they use in-place ops; no autograd). g must be finite; every
exponential the chunked path evaluates has a non-positive argument, so strong decays underflow
to 0 instead of overflowing.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

from prfaas.model import triton_ops

__all__ = [
    "fla_available",
    "fused_available",
    "kda_decode_slots",
    "kda_prefill_fused",
    "kda_chunk",
    "kda_decode",
    "kda_prefill",
    "kda_recurrent",
]

_DISABLE_ENV = "PRFAAS_DISABLE_FLA"
# Upper bound on the elements of the largest intermediate (pairwise decays within sub-chunks)
# materialised at once by the chunked path; chunks are processed in groups below this size.
_MAX_GROUP_ELEMS = 1 << 25


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes/devices; return (B, T, H, K, V)."""
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"v must have shape (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}"
        )
    V = v.shape[3]
    if g.shape != q.shape:
        raise ValueError(f"g must have shape (B, T, H, K) = {tuple(q.shape)}, got {tuple(g.shape)}")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(
            f"beta must have shape (B, T, H) = ({B}, {T}, {H}), got {tuple(beta.shape)}"
        )
    if K == 0 or V == 0 or H == 0 or B == 0:
        raise ValueError(f"empty head/batch dimension: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    device = q.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if initial_state is not None:
        if not isinstance(initial_state, Tensor):
            raise TypeError(
                f"initial_state must be a Tensor or None, got {type(initial_state).__name__}"
            )
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(
                f"initial_state must have shape (B, H, K, V) = ({B}, {H}, {K}, {V}), "
                f"got {tuple(initial_state.shape)}"
            )
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating point, got {initial_state.dtype}")
        if initial_state.device != device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {device}")
    return B, T, H, K, V


def _initial_state_fp32(
    initial_state: Tensor | None, shape: tuple[int, ...], like: Tensor
) -> Tensor:
    if initial_state is None:
        return torch.zeros(shape, dtype=torch.float32, device=like.device)
    return initial_state.to(torch.float32).clone()


# ---------------------------------------------------------------------------------------------
# torch paths
# ---------------------------------------------------------------------------------------------


def kda_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token KDA (decode; T is usually 1). fp32 internally.

    Returns o (B, T, H, V) in v's dtype and the final state (B, H, K, V) fp32.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, scale, initial_state)
    S = _initial_state_fp32(initial_state, (B, H, K, V), q)
    qf, kf, vf, gf, bf = (x.to(torch.float32) for x in (q, k, v, g, beta))
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        S = S * gf[:, t].exp().unsqueeze(-1)
        k_t = kf[:, t]  # (B, H, K)
        pred = torch.einsum("bhk,bhkv->bhv", k_t, S)
        delta = bf[:, t].unsqueeze(-1) * (vf[:, t] - pred)  # (B, H, V)
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S)
    return o.to(v.dtype), S


def _sub_chunk_size(chunk_size: int) -> int:
    return 16 if chunk_size % 16 == 0 else chunk_size


def _chunk_group(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    S: Tensor,
    scale: float,
    sub: int,
) -> tuple[Tensor, Tensor]:
    """Process a group of full chunks. Inputs fp32, head-first chunked:
    q, k, g (B, H, N, C, K); v (B, H, N, C, V); beta (B, H, N, C); S (B, H, K, V).
    Returns o (B, H, N, C, V) and the updated state."""
    B, H, N, C, K = q.shape
    ns = C // sub
    device = q.device
    G = g.cumsum(-2)  # within-chunk cumulative log decay, non-increasing along C

    # Pairwise scores A[i, j] = sum_d x_i[d] k_j[d] exp(G_i[d] - G_j[d]) (x = q or k), j <= i.
    # Every exponent used below is <= 0: off-diagonal sub-chunk blocks factor through the first
    # position s_I of the row's sub-chunk (j < s_I <= i); diagonal blocks are explicit pairwise.
    idx = torch.arange(C, device=device)
    starts = idx[::sub]  # (ns,) first index of each sub-chunk
    Gs = G[..., starts, :]  # (B, H, N, ns, K)
    q_sub = q.view(B, H, N, ns, sub, K)
    k_sub = k.view(B, H, N, ns, sub, K)
    G_rows = G.view(B, H, N, ns, sub, K)
    row_fac = torch.exp(G_rows - Gs.unsqueeze(-2))  # exponent <= 0
    # column factor exp(G_{s_I} - G_j) k_j for j < s_I, zero elsewhere: (B, H, N, ns, C, K)
    k_c = Gs.unsqueeze(-2) - G.unsqueeze(-3)
    col_valid = (idx.unsqueeze(0) < starts.unsqueeze(1)).view(ns, C, 1)
    k_c.masked_fill_(~col_valid, -math.inf).exp_().mul_(k.unsqueeze(-3))
    k_c = k_c.transpose(-1, -2)  # (B, H, N, ns, K, C)
    A_qk = ((q_sub * row_fac) @ k_c).view(B, H, N, C, C)
    A_kk = ((k_sub * row_fac) @ k_c).view(B, H, N, C, C)
    del k_c

    # diagonal sub-chunk blocks: explicit exp(G_i - G_j) k_j for j <= i, (B,H,N,ns,i,j,K)
    tri = torch.ones(sub, sub, dtype=torch.bool, device=device).tril().view(sub, sub, 1)
    pk = G_rows.unsqueeze(-2) - G_rows.unsqueeze(-3)
    pk.masked_fill_(~tri, -math.inf).exp_().mul_(k_sub.unsqueeze(-3))
    d_qk = (pk @ q_sub.unsqueeze(-1)).squeeze(-1)  # (B, H, N, ns, i, j)
    d_kk = (pk @ k_sub.unsqueeze(-1)).squeeze(-1)
    del pk
    # the block diagonal of A (B, H, N, sub, sub, ns) receives the pairwise blocks
    A_qk.view(B, H, N, ns, sub, ns, sub).diagonal(dim1=3, dim2=5).add_(d_qk.movedim(3, -1))
    A_kk.view(B, H, N, ns, sub, ns, sub).diagonal(dim1=3, dim2=5).add_(d_kk.movedim(3, -1))

    # UT transform: (I + strictly_lower(beta_i * A_kk)) [u | w] = beta * [v | exp(G) k]
    strict = torch.ones(C, C, dtype=torch.bool, device=device).tril(-1)
    L = A_kk.mul_(beta.unsqueeze(-1)).masked_fill_(~strict, 0.0)
    L.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    rhs = torch.cat([v, k * G.exp()], dim=-1) * beta.unsqueeze(-1)
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    u, w = sol[..., : v.shape[-1]], sol[..., v.shape[-1] :]

    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    A_qk.masked_fill_(~causal, 0.0).mul_(scale)
    q_dec = q * G.exp() * scale  # (B, H, N, C, K)
    G_last = G[..., -1:, :]  # (B, H, N, 1, K)
    k_tail = (k * torch.exp(G_last - G)).transpose(-1, -2)  # (B, H, N, K, C), exponent <= 0

    # With delta_n = u_n - w_n S_n (the chunk's effective values):
    #   o_n = (q_dec - A_qk w)_n S_n + (A_qk u)_n
    #   S_{n+1} = (diag(exp(G_last)) - k_tail w)_n S_n + (k_tail u)_n
    # so only one K x K by K x V product per chunk is sequential.
    q_eff = q_dec - A_qk @ w
    o_u = A_qk @ u
    trans = -(k_tail @ w)  # (B, H, N, K, K)
    trans.diagonal(dim1=-2, dim2=-1).add_(G_last.squeeze(-2).exp())
    drive = k_tail @ u  # (B, H, N, K, V)
    Vd = v.shape[-1]
    trans = trans.movedim(2, 0).reshape(N, B * H, K, K)
    drive = drive.movedim(2, 0).reshape(N, B * H, K, Vd)
    states = torch.empty(N, B * H, K, Vd, dtype=S.dtype, device=device)
    S = S.reshape(B * H, K, Vd)
    for n in range(N):
        states[n] = S
        S = torch.baddbmm(drive[n], trans[n], S)
    states = states.view(N, B, H, K, Vd).movedim(0, 2)  # (B, H, N, K, V)
    o = q_eff @ states + o_u
    return o, S.view(B, H, K, Vd)


def kda_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked (WY / UT-transform) KDA over a sequence, fp32 internally.

    q, k: (B, T, H, K), already L2-normalised; v: (B, T, H, V); g: (B, T, H, K) log decay (<= 0);
    beta: (B, T, H); initial_state: (B, H, K, V) or None (zeros). Any T >= 1 (padded internally).
    Returns o (B, T, H, V) in v's dtype and the final state (B, H, K, V) fp32.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, scale, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    S = _initial_state_fp32(initial_state, (B, H, K, V), q)
    if T == 0:
        return v.new_empty(B, 0, H, V), S
    C = chunk_size
    sub = _sub_chunk_size(C)
    NT = -(-T // C)
    pad = NT * C - T

    def prep(x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        if pad:
            # zero k/beta/g on padded steps leave the state unchanged
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.reshape(B, NT, C, H, *x.shape[3:])
        return x.movedim(3, 1).contiguous()  # (B, H, NT, C, ...)

    qc, kc, vc, gc, bc = (prep(x) for x in (q, k, v, g, beta))
    per_chunk = H * B * C * sub * K  # elements of the pairwise-decay block per chunk
    group = max(1, _MAX_GROUP_ELEMS // per_chunk)
    outs = []
    for start in range(0, NT, group):
        sl = slice(start, min(NT, start + group))
        o_g, S = _chunk_group(
            qc[:, :, sl],
            kc[:, :, sl],
            vc[:, :, sl],
            gc[:, :, sl],
            bc[:, :, sl],
            S,
            float(scale),
            sub,
        )
        outs.append(o_g)
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (B, H, NT, C, V)
    o = o.movedim(1, 3).reshape(B, NT * C, H, V)[:, :T]
    return o.to(v.dtype), S


# ---------------------------------------------------------------------------------------------
# fla dispatch
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fla_ops() -> (
    tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., tuple[Tensor, Tensor]]] | None
):
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda  # type: ignore[import-not-found]
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return chunk_kda, fused_recurrent_kda


def fla_available() -> bool:
    """True when fla's KDA Triton kernels can be used (importable, CUDA present, not disabled)."""
    if os.environ.get(_DISABLE_ENV, "").strip() not in ("", "0"):
        return False
    if not torch.cuda.is_available():
        return False
    return _fla_ops() is not None


def _use_fla(q: Tensor) -> bool:
    return q.is_cuda and fla_available()


def _fla_args(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    dt = v.dtype
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    return (
        q.to(dt).contiguous(),
        k.to(dt).contiguous(),
        v.contiguous(),
        g.to(torch.float32).contiguous(),
        h0,
    )


def _call_fla(
    fn: Callable[..., tuple[Tensor, Tensor]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One fla KDA kernel (chunk_kda or fused_recurrent_kda: same signature) on our layouts."""
    qf, kf, vf, gf, h0 = _fla_args(q, k, v, g, initial_state)
    o, state = fn(
        qf,
        kf,
        vf,
        gf,
        beta.to(v.dtype).contiguous(),
        scale=float(scale),
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return o.to(v.dtype), state.to(torch.float32)


def kda_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Prefill dispatcher: fla ``chunk_kda`` on CUDA when available, else :func:`kda_chunk`.

    ``chunk_size`` applies to the torch path only (fla picks its own).
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, scale, initial_state)
    if T == 0 or not _use_fla(q):
        return kda_chunk(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size
        )
    return _call_fla(_fla_ops()[0], q, k, v, g, beta, scale, initial_state)  # type: ignore[index]


def kda_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode dispatcher: fla ``fused_recurrent_kda`` on CUDA when available, else
    :func:`kda_recurrent`."""
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, scale, initial_state)
    if T == 0 or not _use_fla(q):
        return kda_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state)
    return _call_fla(_fla_ops()[1], q, k, v, g, beta, scale, initial_state)  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# fused GPU path: gate, beta sigmoid and q/k L2 norm inside fla's kernels, states in cache slots
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fla_recurrent_fwd() -> Callable[..., tuple[Tensor, Tensor]] | None:
    try:
        from fla.ops.kda.fused_recurrent import (  # type: ignore[import-not-found]
            fused_recurrent_kda_fwd,
        )
    except Exception:
        return None
    return fused_recurrent_kda_fwd


def fused_available(x: Tensor) -> bool:
    """True when the fused GPU path runs for ``x``: :func:`kda_prefill_fused` /
    :func:`kda_decode_slots` and the Triton kernels of :mod:`prfaas.model.triton_ops` beside them."""
    return triton_ops.enabled(x) and fla_available() and _fla_recurrent_fwd() is not None


def kda_prefill_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_raw: Tensor,
    beta_raw: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """fla ``chunk_kda`` with the un-normalised q/k, the raw gate input (before ``dt_bias``,
    softplus and ``-exp(A_log)``) and the raw beta logits: the same function as
    :func:`kda_prefill` on ``normalize(q)``, ``normalize(k)``, the gate and ``sigmoid(beta)``."""
    o, state = _fla_ops()[0](  # type: ignore[index]
        q,
        k,
        v,
        g_raw,
        beta_raw,
        scale=float(scale),
        initial_state=None if initial_state is None else initial_state.float().contiguous(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        A_log=A_log.reshape(-1),
        dt_bias=dt_bias.reshape(-1),
    )
    return o, state


def kda_decode_slots(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_raw: Tensor,
    beta_raw: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    *,
    scale: float,
    states: Tensor,
    slots: Tensor,
    cu_seqlens: Tensor,
) -> Tensor:
    """One decode token per row with the recurrent state read from and written back to
    ``states[slots[i]]`` in place (fla's continuous-batching mode). q, k (B, H, K), v (B, H, V),
    g_raw (B, H, K), beta_raw (B, H), all contiguous; ``cu_seqlens`` (B+1,) = [0, 1, .., n, n, ..]
    gives padding rows (the trailing B - n) zero tokens, so they neither compute nor write.
    Returns o (B, H, V)."""
    B = q.shape[0]
    o, _ = _fla_recurrent_fwd()(  # type: ignore[misc]
        q[None],
        k[None],
        v[None],
        g_raw[None],
        beta_raw[None],
        A_log=A_log.reshape(-1),
        dt_bias=dt_bias.reshape(-1),
        initial_state=states,
        scale=float(scale),
        inplace_final_state=True,
        cu_seqlens=cu_seqlens,
        ssm_state_indices=slots,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
    )
    return o.view(B, *o.shape[2:])
