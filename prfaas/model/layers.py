"""Building blocks shared by the hybrid decoder: RMSNorm, the dense MLP and the sigmoid-routed MoE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One routed expert, checkpoint names w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEGate(nn.Module):
    def __init__(self, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False)


class SparseMoE(nn.Module):
    """Sigmoid router with score-correction bias (used only for choosing), top-k, optional
    renormalisation, routed scaling, plus always-on shared experts (Kimi / DeepSeek-V3 style)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.top_k = cfg.num_experts_per_token
        self.renormalize = cfg.moe_renormalize
        self.scaling = cfg.routed_scaling_factor
        self.gate = MoEGate(h, cfg.num_experts)
        self.experts = nn.ModuleList(
            [Expert(h, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)]
        )
        self.shared_experts = (
            DenseMLP(h, cfg.moe_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, h) -> (weights (T, k), expert ids (T, k))."""
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        choice = scores + self.gate.e_score_correction_bias.float()
        idx = torch.topk(choice, self.top_k, dim=-1, sorted=True).indices
        w = scores.gather(-1, idx)
        if self.renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        flat_idx = idx.reshape(-1)
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            sel = order[start : start + c]
            start += c
            toks = token_of[sel]
            y = self.experts[e](x[toks]).float() * w.reshape(-1)[sel, None]
            out[toks] += y  # a token picks an expert at most once: indices are unique
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return out.to(x.dtype).reshape(shape)
