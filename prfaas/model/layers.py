"""Building blocks shared by the hybrid decoder: RMSNorm, the dense MLP and the sigmoid-routed MoE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model import moe_ops, triton_ops
from prfaas.model.config import ModelConfig
from prfaas.model.tp.group import TPGroup
from prfaas.model.tp.layers import ep_experts_forward, row_linear, tp_size


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


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` in fp32, rounded once to gate's dtype (what
    ``triton_ops.silu_mul`` and the fused MoE kernels compute)."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


class RMSNorm(nn.Module):
    """RMSNorm in fp32 arithmetic. The decoder's norms take the residual stream (fp32, see
    ``HybridForCausalLM.residual_dtype``) and hand the layers their input in the weights' dtype
    (``out_dtype``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``norm(x) * weight`` as ``out_dtype`` (default x's dtype)."""
        dtype = out_dtype or x.dtype
        if triton_ops.enabled(x):
            return triton_ops.rms_norm(x, self.weight, self.eps, out_dtype=dtype)[0]
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)

    def add_forward(
        self, x: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: the residual add and the norm after it (one kernel on
        the GPU). The sum is computed in fp32 and kept in x's dtype (the residual stream's), the
        norm's output is ``out_dtype`` (default x's dtype)."""
        if triton_ops.enabled(x):
            y, s = triton_ops.rms_norm(
                x, self.weight, self.eps, residual=delta, out_dtype=out_dtype
            )
            return s, y
        s = (x.float() + delta.float()).to(x.dtype)
        return s, self(s, out_dtype)


LOGITS_CHUNK = 16384  # vocabulary rows per fp32 GEMM where the weight is upcast (CPU)
_mm_out_dtype_ok: dict[torch.device, bool] = {}


def linear_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (x (N, h) and weight (V, h) in one dtype) as fp32, never rounded to a
    16-bit dtype: the logits of a bf16 model keep the fp32 accumulator's precision (a bf16 logit
    of magnitude 4 is only known to 0.016, as much as the margin between the top two tokens of
    a flat distribution). On CUDA one cuBLAS GEMM with fp32 output (``torch.mm(...,
    out_dtype=torch.float32)``; the output is written once in fp32 instead of written in bf16
    and copied to fp32); elsewhere fp32 GEMMs over ``LOGITS_CHUNK`` rows of the weight upcast at
    a time (the same products and fp32 sums)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda and x.dtype == weight.dtype and _mm_out_dtype_ok.get(x.device, True):
        try:
            out = torch.mm(x2, weight.t(), out_dtype=torch.float32)
            return out.view(*x.shape[:-1], weight.shape[0])
        except (RuntimeError, TypeError):  # a torch without the fp32-output GEMM
            _mm_out_dtype_ok[x.device] = False
    if x.is_cuda:  # no cheap exact way: the dtype's GEMM, its output upcast
        return F.linear(x, weight.to(x.dtype)).float()
    xf = x2.float()
    out = torch.cat([F.linear(xf, w.float()) for w in weight.split(LOGITS_CHUNK)], -1)
    return out.view(*x.shape[:-1], weight.shape[0])


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names gate_proj / up_proj / down_proj.

    With ``tp`` (tensor parallel): the rank's ``inter / size`` columns of the width; ``down_proj``
    sums the ranks' partial outputs unless ``reduce`` is False (the MoE's shared experts: the MoE
    sums once for routed and shared experts together)."""

    def __init__(
        self, hidden: int, inter: int, tp: TPGroup | None = None, reduce: bool = True
    ) -> None:
        super().__init__()
        n = tp_size(tp)
        self.gate_proj = nn.Linear(hidden, inter // n, bias=False)
        self.up_proj = nn.Linear(hidden, inter // n, bias=False)
        if reduce:
            self.down_proj = row_linear(inter, hidden, tp)
        else:
            self.down_proj = nn.Linear(inter // n, hidden, bias=False)
        self._gate_up: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops.enabled(x):  # one GEMM for gate|up, one kernel for silu(gate) * up
            w = stacked_weight(self._gate_up, (self.gate_proj.weight, self.up_proj.weight))
            return self.down_proj(triton_ops.silu_mul(F.linear(x, w)))
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class Expert(nn.Module):
    """One routed expert, checkpoint names w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


class MoEGate(nn.Module):
    def __init__(self, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False)


class SparseMoE(nn.Module):
    """Sigmoid router with score-correction bias (used only for choosing), top-k, optional
    renormalisation, routed scaling, plus always-on shared experts (Kimi / DeepSeek-V3 style).

    ``forward`` on CUDA (fused path enabled) runs :func:`moe_ops.experts_forward`: grouped GEMMs
    over the experts' weights stacked in two tensors, no host sync. :meth:`pack_experts` stacks them
    (the experts' parameters become views of the stacked tensors, so there is one copy of the
    weights; a later ``.to()`` or ``load_state_dict(assign=True)`` unpacks them, and the next fused
    forward packs again). Elsewhere ``forward`` is the reference: a loop over the chosen experts.
    ``record`` (a list, default None): the whole-batch path appends each call's expert ids (the
    benchmarks count the experts a step touches).

    With ``tp`` (expert parallel): the router is whole, the rank holds experts
    ``first .. first + E / size - 1`` (``experts[0]`` is global expert ``first``) and the shared
    experts' slice of the width; :meth:`forward` sums the ranks' partial outputs."""

    CHUNK = 16384  # tokens per pass of the whole-batch path

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        h = cfg.hidden_size
        n = tp_size(tp)
        self.tp = tp if n > 1 else None
        self.first = (cfg.num_experts // n) * (tp.rank if n > 1 else 0)
        self.top_k = cfg.num_experts_per_token
        self.renormalize = cfg.moe_renormalize
        self.scaling = cfg.routed_scaling_factor
        self.gate = MoEGate(h, cfg.num_experts)
        self.experts = nn.ModuleList(
            [Expert(h, cfg.moe_intermediate_size) for _ in range(cfg.num_experts // n)]
        )
        self.shared_experts = (
            DenseMLP(h, cfg.moe_intermediate_size * cfg.num_shared_experts, tp, reduce=False)
            if cfg.num_shared_experts
            else None
        )
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.record: list[torch.Tensor] | None = None

    # ----- stacked expert weights -----------------------------------------------------------
    def _views_key(self) -> tuple:
        first, last = self.experts[0], self.experts[-1]
        return (first.w1.weight.data_ptr(), last.w2.weight.data_ptr(), first.w1.weight.dtype)

    def is_packed(self) -> bool:
        if self._stacked is None:
            return False
        w13, w2 = self._stacked
        first = self.experts[0]
        return self._views_key() == (w13.data_ptr(), w2[-1].data_ptr(), w13.dtype) and (
            first.w1.weight.device == w13.device
        )

    @torch.no_grad()
    def pack_experts(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the experts' weights into ``w13`` (E, 2I, H) = [w1 | w3] per expert and ``w2``
        (E, H, I), and make each expert's parameters views of them (expert by expert: the extra
        memory is one expert's weights). Experts on the meta device are not copied: the stacked
        tensors are allocated empty on ``device`` in ``dtype`` (default: where the experts are).
        Returns (w13, w2)."""
        if self.is_packed() and device is None and dtype is None:
            return self._stacked
        e0 = self.experts[0]
        E, (inter, h) = len(self.experts), e0.w1.weight.shape
        dev = torch.device(device) if device is not None else e0.w1.weight.device
        dt = dtype or e0.w1.weight.dtype
        with torch.inference_mode(False):
            w13 = torch.empty(E, 2 * inter, h, device=dev, dtype=dt)
            w2 = torch.empty(E, h, inter, device=dev, dtype=dt)
            for e, ex in enumerate(self.experts):
                if ex.w1.weight.device.type != "meta":
                    w13[e, :inter].copy_(ex.w1.weight)
                    w13[e, inter:].copy_(ex.w3.weight)
                    w2[e].copy_(ex.w2.weight)
                ex.w1.weight = nn.Parameter(w13[e, :inter], requires_grad=False)
                ex.w3.weight = nn.Parameter(w13[e, inter:], requires_grad=False)
                ex.w2.weight = nn.Parameter(w2[e], requires_grad=False)
        self._stacked = (w13, w2)
        return self._stacked

    # ----- forward ------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, h) -> (weights (T, k), expert ids (T, k))."""
        g = self.gate
        return moe_ops.route(
            x, g.weight, g.e_score_correction_bias, self.top_k, self.renormalize, self.scaling
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:
            return self.forward_expert_parallel(x)
        if triton_ops.enabled(x):
            return self.forward_grouped(x)
        return self.forward_reference(x)

    def forward_expert_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """The rank's experts' share plus its shared-expert share, summed over the ranks."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.shape[0] > self.CHUNK:
            parts = [self.forward_expert_parallel(c) for c in x.split(self.CHUNK)]
            return torch.cat(parts).reshape(shape)
        w, idx = self.route(x)
        if self.record is not None:
            self.record.append(idx)
        w13, w2 = self.pack_experts()
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = ep_experts_forward(x, w, idx, self.first, w13, w2, shared)
        return self.tp.all_reduce(out).reshape(shape)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The whole-batch path (:mod:`moe_ops`): no host sync on CUDA; on the CPU the grouped
        GEMMs run as loops (what the tests compare with :meth:`forward_reference`)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.shape[0] > self.CHUNK:  # long prefills: bounded intermediates (T*k rows each)
            parts = [self.forward_grouped(c) for c in x.split(self.CHUNK)]
            return torch.cat(parts).reshape(shape)
        w, idx = self.route(x)
        if self.record is not None:
            self.record.append(idx)
        w13, w2 = self.pack_experts()
        sh, shared_w = self.shared_experts, None
        if sh is not None:  # as weights: the per-pair kernels take the shared expert along
            shared_w = (
                stacked_weight(sh._gate_up, (sh.gate_proj.weight, sh.up_proj.weight)),
                sh.down_proj.weight,
            )
        return moe_ops.experts_forward(x, w, idx, w13, w2, shared_weights=shared_w).reshape(shape)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
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
