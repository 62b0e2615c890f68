"""KDA (Kimi Delta Attention) layer: projections, short causal convolutions, per-channel decay, the
delta-rule recurrence (prfaas.model.kda_ops) and the gated output norm.

State per request: the recurrent state (H, K, V) fp32 and the short-conv state (3, W, kernel-1)
holding the last kernel-1 pre-convolution inputs of q, k and v.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model import kda_ops, triton_ops
from prfaas.model.config import ModelConfig
from prfaas.model.layers import RMSNorm, stacked_weight
from prfaas.model.tp.group import TPGroup
from prfaas.model.tp.layers import row_linear, tp_size


class KDAAttention(nn.Module):
    """``tp`` (tensor parallel): the rank's ``kda_num_heads / size`` heads; ``o_proj`` sums the
    ranks' partial outputs. H and W below are the rank's heads and width."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        h, H, D = cfg.hidden_size, cfg.kda_num_heads // tp_size(tp), cfg.kda_head_dim
        W = H * D
        self.H, self.D, self.W, self.kernel = H, D, W, cfg.short_conv_kernel_size
        self.q_proj = nn.Linear(h, W, bias=False)
        self.k_proj = nn.Linear(h, W, bias=False)
        self.v_proj = nn.Linear(h, W, bias=False)
        self.q_conv1d = nn.Conv1d(W, W, self.kernel, groups=W, bias=False)
        self.k_conv1d = nn.Conv1d(W, W, self.kernel, groups=W, bias=False)
        self.v_conv1d = nn.Conv1d(W, W, self.kernel, groups=W, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1))
        self.dt_bias = nn.Parameter(torch.empty(W))
        self.f_a_proj = nn.Linear(h, D, bias=False)
        self.f_b_proj = nn.Linear(D, W, bias=False)
        self.b_proj = nn.Linear(h, H, bias=False)
        self.g_a_proj = nn.Linear(h, D, bias=False)
        self.g_b_proj = nn.Linear(D, W, bias=False)
        self.o_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.o_proj = row_linear(cfg.kda_num_heads * D, h, tp)
        self.scale = 1.0 / math.sqrt(D)
        self._fused: dict = {}
        self._fused_conv: dict = {}

    def _in_weight(self) -> torch.Tensor:
        """q/k/v/f_a/g_a/b weights stacked into one matrix (one GEMM per step instead of six),
        rebuilt when any of them is replaced or modified in place."""
        mods = (self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.g_a_proj, self.b_proj)
        return stacked_weight(self._fused, tuple(m.weight for m in mods))

    def _conv_weight(self) -> torch.Tensor:
        """The q/k/v depthwise conv weights stacked to (3W, kernel), cached like _in_weight."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        return stacked_weight(self._fused_conv, tuple(c.weight for c in convs))[:, 0]

    def _conv(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv of q|k|v with carried state, then SiLU. x (B, n, 3W), state
        (B, 3W, k-1). The products, sums and SiLU in fp32, the output rounded once to x's dtype
        (as the fused kernels compute it); the new state holds the inputs in x's dtype."""
        xt = torch.cat([state.to(x.dtype), x.transpose(1, 2)], -1)  # (B, 3W, k-1+n)
        n = x.shape[1]
        w = self._conv_weight().float()  # (3W, k)
        xf = xt.float()
        # depthwise causal conv as k shifted multiply-adds (much faster than conv1d for k = 4)
        y = xf[..., 0:n] * w[:, 0, None]
        for j in range(1, self.kernel):
            y = y + xf[..., j : j + n] * w[:, j, None]
        return F.silu(y).to(x.dtype).transpose(1, 2), xt[..., -(self.kernel - 1) :]

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None, conv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, n, h) with per-sequence states (B, H, K, V) and (B, 3, W, k-1) (None = zeros).
        n == 1 uses the recurrent kernel, n > 1 the chunked one. Returns (out, state, conv_state)."""
        B, n, _ = x.shape
        if n > 1 and kda_ops.fused_available(x):
            return self._forward_fused(x, state, conv_state)
        if conv_state is None:
            conv_state = x.new_zeros(B, 3, self.W, self.kernel - 1)
        W, D = self.W, self.D
        qkv, fa, ga, bb = F.linear(x, self._in_weight()).split([3 * W, D, D, self.H], -1)
        # conv_state (B, 3, W, k-1) is q|k|v in the channel order of the stacked conv weight
        qkv, new_conv = self._conv(qkv, conv_state.reshape(B, 3 * W, self.kernel - 1))
        new_conv = new_conv.view(B, 3, W, self.kernel - 1)
        qk = F.normalize(qkv[..., : 2 * W].reshape(B, n, 2 * self.H, D).float(), dim=-1, eps=1e-6)
        q, k = qk.split(self.H, dim=2)
        v = qkv[..., 2 * W :].reshape(B, n, self.H, D)
        g = self.f_b_proj(fa).float() + self.dt_bias.float()
        g = -self.A_log.float().exp() * F.softplus(g.view(B, n, self.H, self.D))
        beta = torch.sigmoid(bb.float())
        fn = kda_ops.kda_decode if n == 1 else kda_ops.kda_prefill
        # normalised q, k and beta stay fp32 (the fused kernels normalise and take the sigmoid
        # inside, in fp32); the recurrence computes in fp32 and returns o in v's dtype
        o, new_state = fn(q, k, v, g, beta, scale=self.scale, initial_state=state)
        of = self.o_norm(o.float())
        gate = self.g_b_proj(ga).view(B, n, self.H, self.D)
        of = of * torch.sigmoid(gate.float())
        return self.o_proj(of.to(x.dtype).reshape(B, n, self.W)), new_state, new_conv

    # ----- fused GPU paths (fla + prfaas.model.triton_ops); the code above is their reference ----
    def _forward_fused(
        self, x: torch.Tensor, state: torch.Tensor | None, conv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` for a prefill chunk on the GPU: the causal conv (SiLU fused) reads the
        in-projection's output in place and writes q, k, v contiguous; chunked KDA with the gate,
        beta sigmoid and q/k L2 norm inside fla's kernels; fused gated norm."""
        B, n, _ = x.shape
        W, D, H, k1 = self.W, self.D, self.H, self.kernel - 1
        qkv, fa, ga, bb = F.linear(x, self._in_weight()).split([3 * W, D, D, H], -1)
        init = None if conv_state is None else conv_state.reshape(B, 3 * W, k1)
        y, fin = triton_ops.causal_conv(qkv, self._conv_weight(), init, parts=3)
        q, k, v = (t.view(B, n, H, D) for t in y)
        o, new_state = kda_ops.kda_prefill_fused(
            q,
            k,
            v,
            self.f_b_proj(fa).view(B, n, H, D),
            bb,
            self.A_log,
            self.dt_bias,
            scale=self.scale,
            initial_state=state,
        )
        gate = self.g_b_proj(ga).view(B, n, H, D)
        of = triton_ops.rms_norm_gated(o, gate, self.o_norm.weight, self.o_norm.eps, x.dtype)
        return self.o_proj(of.reshape(B, n, W)), new_state, fin.view(B, 3, W, k1)

    def decode_slots(
        self,
        x: torch.Tensor,
        states: torch.Tensor,
        conv_states: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
        cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """One decode token per row on the GPU, reading and updating the recurrent and conv states
        in their cache slots in place. x (B, h); states (S, H, K, V) and conv_states
        (S, 3, W, kernel-1) are the whole cache tensors of this layer; slots, valid (B,);
        cu_seqlens (B+1,) = [0, 1, .., n, n, ..] (padding rows trail). Returns (B, h)."""
        B = x.shape[0]
        W, D, H = self.W, self.D, self.H
        qkv, fa, ga, bb = F.linear(x, self._in_weight()).split([3 * W, D, D, H], -1)
        conv = conv_states.view(conv_states.shape[0], 3 * W, self.kernel - 1)
        y = triton_ops.conv_update(qkv, conv, self._conv_weight(), slots, valid, parts=3)
        q, k, v = (t.view(B, H, D) for t in y)
        o = kda_ops.kda_decode_slots(
            q,
            k,
            v,
            self.f_b_proj(fa).view(B, H, D),
            bb.contiguous(),
            self.A_log,
            self.dt_bias,
            scale=self.scale,
            states=states,
            slots=slots,
            cu_seqlens=cu_seqlens,
        )
        gate = self.g_b_proj(ga).view(B, H, D)
        of = triton_ops.rms_norm_gated(o, gate, self.o_norm.weight, self.o_norm.eps, x.dtype)
        return self.o_proj(of.view(B, W))
