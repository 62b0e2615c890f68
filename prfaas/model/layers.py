"""Building blocks shared by the hybrid decoder: RMSNorm, the dense MLP and the sigmoid-routed MoE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model import triton_ops
from prfaas.model.config import ModelConfig


def _version(t: torch.Tensor) -> int:
    """In-place update counter; inference tensors keep none (-1: only a new tensor is noticed)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def stacked_weight(cache: dict, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``weights`` concatenated along dim 0 (one GEMM or kernel instead of several), kept in
    ``cache`` and rebuilt when any of them is replaced or modified in place."""
    key = tuple((w.data_ptr(), _version(w), w.dtype) for w in weights)
    if cache.get("key") != key:
        with torch.no_grad():
            cache["w"] = torch.cat(weights).detach()
        cache["key"] = key
    return cache["w"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops.enabled(x):
            return triton_ops.rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)

    def add_forward(
        self, x: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: the residual add and the norm after it (one kernel on
        the GPU)."""
        if triton_ops.enabled(x):
            y, s = triton_ops.rms_norm(x, self.weight, self.eps, residual=delta)
            return s, y
        s = x + delta
        return s, self(s)


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self._gate_up: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops.enabled(x):  # one GEMM for gate|up, one kernel for silu(gate) * up
            w = stacked_weight(self._gate_up, (self.gate_proj.weight, self.up_proj.weight))
            return self.down_proj(triton_ops.silu_mul(F.linear(x, w)))
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
