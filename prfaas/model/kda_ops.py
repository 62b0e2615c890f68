"""Kimi Delta Attention (KDA) kernels: chunked (WY/UT) and recurrent torch paths, fla dispatch.

Layouts are batch-first and fla-compatible: q, k (B, T, H, K); v (B, T, H, V); g (B, T, H, K)
log-space per-channel decay (<= 0); beta (B, T, H); state (B, H, K, V) fp32.

Per token and head: ``S <- diag(exp(g_t)) S``; ``S <- S + beta_t k_t (v_t - k_t^T S)^T``;
``o_t = scale * q_t^T S``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "fla_available",
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
    sub_start = (idx // sub) * sub  # (C,) first index of each row's sub-chunk
    Gs = G[..., sub_start[::sub], :]  # (B, H, N, ns, K) G at sub-chunk starts
    G_rows = G.view(B, H, N, ns, sub, K)
    row_fac = torch.exp(G_rows - Gs.unsqueeze(-2))  # (B,H,N,ns,sub,K), exponent <= 0
    q_r = (q.view(B, H, N, ns, sub, K) * row_fac).view(B, H, N, C, K)
    k_r = (k.view(B, H, N, ns, sub, K) * row_fac).view(B, H, N, C, K)
    # column factor exp(G_{s_I} - G_j) for j < s_I, zero elsewhere
    col_exp = Gs.unsqueeze(-2) - G.unsqueeze(-3)  # (B, H, N, ns, C, K)
    col_valid = (idx.unsqueeze(0) < sub_start[::sub].unsqueeze(1)).view(1, 1, 1, ns, C, 1)
    col_fac = torch.exp(torch.where(col_valid, col_exp, torch.full_like(col_exp, -math.inf)))
    k_c = k.unsqueeze(-3) * col_fac  # (B, H, N, ns, C, K)
    A_qk = torch.einsum("bhnisk,bhnijk->bhnisj", q_r.view(B, H, N, ns, sub, K), k_c)
    A_kk = torch.einsum("bhnisk,bhnijk->bhnisj", k_r.view(B, H, N, ns, sub, K), k_c)
    A_qk = A_qk.reshape(B, H, N, C, C)
    A_kk = A_kk.reshape(B, H, N, C, C)

    # diagonal sub-chunk blocks: explicit exp(G_i - G_j) for j <= i (masked to -inf above)
    tri = torch.ones(sub, sub, dtype=torch.bool, device=device).tril()
    diff = G_rows.unsqueeze(-2) - G_rows.unsqueeze(-3)  # (B,H,N,ns,sub_i,sub_j,K)
    diff = torch.where(tri.view(sub, sub, 1), diff, torch.full_like(diff, -math.inf))
    pair = torch.exp(diff)
    k_sub = k.view(B, H, N, ns, sub, K)
    d_qk = torch.einsum("bhnaik,bhnaijk,bhnajk->bhnaij", q.view(B, H, N, ns, sub, K), pair, k_sub)
    d_kk = torch.einsum("bhnaik,bhnaijk,bhnajk->bhnaij", k_sub, pair, k_sub)
    blk = torch.arange(ns, device=device)
    A_qk.view(B, H, N, ns, sub, ns, sub)[:, :, :, blk, :, blk, :] += d_qk.permute(3, 0, 1, 2, 4, 5)
    A_kk.view(B, H, N, ns, sub, ns, sub)[:, :, :, blk, :, blk, :] += d_kk.permute(3, 0, 1, 2, 4, 5)

    # UT transform: (I + strictly_lower(beta_i * A_kk)) [u | w] = beta * [v | exp(G) k]
    strict = torch.ones(C, C, dtype=torch.bool, device=device).tril(-1)
    L = torch.where(strict, A_kk * beta.unsqueeze(-1), torch.zeros((), device=device))
    L = L + torch.eye(C, device=device)
    rhs = torch.cat([v, k * G.exp()], dim=-1) * beta.unsqueeze(-1)
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    u, w = sol[..., : v.shape[-1]], sol[..., v.shape[-1] :]

    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    A_qk = torch.where(causal, A_qk, torch.zeros((), device=device)) * scale
    q_dec = q * G.exp() * scale  # (B, H, N, C, K)
    G_last = G[..., -1:, :]  # (B, H, N, 1, K)
    k_tail = k * torch.exp(G_last - G)  # (B, H, N, C, K), exponent <= 0
    state_decay = G_last.squeeze(-2).exp().unsqueeze(-1)  # (B, H, N, K, 1)

    o = torch.empty_like(v)
    for n in range(N):
        delta = u[:, :, n] - w[:, :, n] @ S  # (B, H, C, V)
        o[:, :, n] = q_dec[:, :, n] @ S + A_qk[:, :, n] @ delta
        S = state_decay[:, :, n] * S + k_tail[:, :, n].transpose(-1, -2) @ delta
    return o, S


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
    chunk_kda, _ = _fla_ops()  # type: ignore[misc]
    qf, kf, vf, gf, h0 = _fla_args(q, k, v, g, initial_state)
    o, state = chunk_kda(
        qf,
        kf,
        vf,
        gf,
        beta.contiguous(),
        scale=float(scale),
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return o.to(v.dtype), state.to(torch.float32)


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
    _, fused_recurrent_kda = _fla_ops()  # type: ignore[misc]
    qf, kf, vf, gf, h0 = _fla_args(q, k, v, g, initial_state)
    o, state = fused_recurrent_kda(
        qf,
        kf,
        vf,
        gf,
        beta.contiguous(),
        scale=float(scale),
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return o.to(v.dtype), state.to(torch.float32)
