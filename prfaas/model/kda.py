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

from prfaas.model import kda_ops
from prfaas.model.config import ModelConfig
from prfaas.model.layers import RMSNorm


class KDAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, H, D = cfg.hidden_size, cfg.kda_num_heads, cfg.kda_head_dim
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
        self.o_proj = nn.Linear(W, h, bias=False)
        self.scale = 1.0 / math.sqrt(D)

    def _conv(
        self, conv: nn.Conv1d, x: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv with carried state. x (B, n, W), state (B, W, k-1)."""
        xt = torch.cat([state.to(x.dtype), x.transpose(1, 2)], -1)  # (B, W, k-1+n)
        n = x.shape[1]
        w = conv.weight.to(x.dtype)[:, 0]  # (W, k)
        # depthwise causal conv as k shifted multiply-adds (much faster than conv1d for k = 4)
        y = xt[..., 0:n] * w[:, 0, None]
        for j in range(1, self.kernel):
            y = y + xt[..., j : j + n] * w[:, j, None]
        return F.silu(y).transpose(1, 2), xt[..., -(self.kernel - 1) :]

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None, conv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, n, h) with per-sequence states (B, H, K, V) and (B, 3, W, k-1) (None = zeros).
        n == 1 uses the recurrent kernel, n > 1 the chunked one. Returns (out, state, conv_state)."""
        B, n, _ = x.shape
        if conv_state is None:
            conv_state = x.new_zeros(B, 3, self.W, self.kernel - 1)
        q, cq = self._conv(self.q_conv1d, self.q_proj(x), conv_state[:, 0])
        k, ck = self._conv(self.k_conv1d, self.k_proj(x), conv_state[:, 1])
        v, cv = self._conv(self.v_conv1d, self.v_proj(x), conv_state[:, 2])
        new_conv = torch.stack([cq, ck, cv], 1)
        q = F.normalize(q.view(B, n, self.H, self.D).float(), dim=-1, eps=1e-6)
        k = F.normalize(k.view(B, n, self.H, self.D).float(), dim=-1, eps=1e-6)
        v = v.view(B, n, self.H, self.D)
        g = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        g = -self.A_log.float().exp() * F.softplus(g.view(B, n, self.H, self.D))
        beta = torch.sigmoid(self.b_proj(x).float())
        fn = kda_ops.kda_decode if n == 1 else kda_ops.kda_prefill
        o, new_state = fn(
            q.to(v.dtype),
            k.to(v.dtype),
            v,
            g,
            beta.to(v.dtype),
            scale=self.scale,
            initial_state=state,
        )
        of = self.o_norm(o.float())
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, n, self.H, self.D)
        of = of * torch.sigmoid(gate.float())
        return self.o_proj(of.to(x.dtype).reshape(B, n, self.W)), new_state, new_conv
