"""MLA: multi-head latent attention with a compressed KV cache (kv_lora_rank + rope values per token).

Prefill expands the latent into per-head keys and values; decode uses the absorbed form (queries are
projected into the latent space, so attention reads the compressed cache directly). Both compute the
same function; tests check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from prfaas.model.config import ModelConfig
from prfaas.model.layers import RMSNorm
from prfaas.model.mla_paged import paged_mla_decode
from prfaas.model.tp.group import TPGroup
from prfaas.model.tp.layers import row_linear, tp_size


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half rotary embedding; x (..., T, [H,] D) with pos (T,)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    if x.dim() == 3:  # (T, H, D)
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class MLAAttention(nn.Module):
    """``tp`` (tensor parallel): the rank's ``num_attention_heads / size`` heads (``nh``); the
    latent projection is whole (every rank computes and caches the same latent KV); ``o_proj``
    sums the ranks' partial outputs."""

    # does SDPA run a fused kernel with v narrower than q/k? (per kind: causal, explicit mask)
    _narrow_v_ok: dict[bool, bool] = {}

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_attention_heads // tp_size(tp)
        self.nh = nh
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.q_proj = nn.Linear(h, nh * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.kv_a_layernorm_eps)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope + self.vdim), bias=False)
        self.o_proj = row_linear(cfg.num_attention_heads * self.vdim, h, tp)
        self.scale = (self.nope + self.rope) ** -0.5

    # ----- projections ------------------------------------------------------------------------
    def queries(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, h) -> q_nope (T, H, nope), q_pe (T, H, rope)."""
        q = self.q_proj(x).view(x.shape[0], self.nh, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], -1)
        if not self.cfg.mla_use_nope and self.rope:
            q_pe = _rope(q_pe, pos, self.cfg.rope_theta)
        return q_nope, q_pe

    def latent(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (T, h) -> what the cache holds per token: (T, rank + rope) = [norm(c_kv), k_pe]."""
        kv = self.kv_a_proj_with_mqa(x)
        c, k_pe = kv.split([self.rank, self.rope], -1)
        if not self.cfg.mla_use_nope and self.rope:
            k_pe = _rope(k_pe, pos, self.cfg.rope_theta)
        return torch.cat([self.kv_a_layernorm(c), k_pe], -1)

    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.nh, self.nope + self.vdim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]  # W_UK (H, nope, r), W_UV (H, v, r)

    # ----- attention --------------------------------------------------------------------------
    def attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Queries at positions start.. over latents 0..L-1 (causal). Returns (n, H*v)."""
        n, L = q_nope.shape[0], lat.shape[0]
        c, k_pe = lat.split([self.rank, self.rope], -1)
        kv = self.kv_b_proj(c).view(L, self.nh, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], -1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(L, self.nh, self.rope)], -1)
        q = torch.cat([q_nope, q_pe], -1)
        qk = self.nope + self.rope
        if start == 0 and n == L:  # plain causal: lets SDPA pick a flash kernel
            mask, causal = None, True
        else:
            qpos = torch.arange(start, start + n, device=lat.device)
            mask, causal = torch.arange(L, device=lat.device)[None, :] <= qpos[:, None], False

        def sdpa(vv: torch.Tensor) -> torch.Tensor:  # fused kernels need 4-D (batch, heads, ..)
            return F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                vv.transpose(0, 1)[None],
                attn_mask=mask,
                is_causal=causal,
                scale=self.scale,
            )[0, ..., : self.vdim]

        o = None
        if self.vdim < qk and q.is_cuda and MLAAttention._narrow_v_ok.get(causal, True):
            # cuDNN's attention takes a narrower v (a sixth fewer FLOPs than padding it); where
            # no fused kernel does, SDPA would fall back to the slow math path, so check once
            fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
            with sdpa_kernel(fused + [SDPBackend.EFFICIENT_ATTENTION]):
                try:
                    o = sdpa(v)
                    MLAAttention._narrow_v_ok[causal] = True
                except RuntimeError:
                    MLAAttention._narrow_v_ok[causal] = False
        if o is None:
            if self.vdim < qk:  # one head size for every fused kernel: pad v, slice the output
                v = F.pad(v, (0, qk - self.vdim))
            o = sdpa(v)
        return o.transpose(0, 1).reshape(n, self.nh * self.vdim)

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Decode: one query per sequence. q_* (B, H, d); lat (B, Lmax, r+rope) padded; lengths (B,).
        Returns (B, H*v)."""
        w_uk, w_uv = self._absorb_weights()
        c, k_pe = lat.split([self.rank, self.rope], -1)
        dt = lat.dtype  # the big products read the cache in its own dtype (fp32 accumulation)
        q_abs = torch.einsum("bhn,hnr->bhr", q_nope.float(), w_uk.float())
        s = torch.matmul(q_abs.to(dt), c.transpose(1, 2)).float()  # (B, H, L)
        if self.rope:
            s = s + torch.matmul(q_pe.to(dt), k_pe.transpose(1, 2)).float()
        s = s * self.scale
        valid = torch.arange(lat.shape[1], device=lat.device)[None, :] < lengths[:, None]
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        p = torch.softmax(s, -1)
        o_lat = torch.matmul(p.to(dt), c).float()  # (B, H, r)
        o = torch.einsum("bhr,hvr->bhv", o_lat, w_uv.float())
        return o.reshape(o.shape[0], -1).to(q_nope.dtype)

    def attend_paged(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        cache: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        block_size: int,
    ) -> torch.Tensor:
        """:meth:`attend_absorbed` reading the paged cache in place (GPU: prfaas.model.mla_paged's
        Triton kernel). cache (rows, r+rope) flat; block_tables (B, NB); lengths (B,).
        Returns (B, H*v)."""
        w_uk, w_uv = self._absorb_weights()
        dt = cache.dtype
        # absorb W_UK into the queries and W_UV into the output: batched GEMMs over the heads
        q_lat = torch.bmm(q_nope.transpose(0, 1).to(dt), w_uk.to(dt)).transpose(0, 1)
        o_lat = paged_mla_decode(
            q_lat, q_pe.to(dt), cache, block_tables, lengths, block_size, self.scale, out_dtype=dt
        )
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.to(dt).transpose(1, 2))  # (H, B, v)
        return o.transpose(0, 1).reshape(o.shape[1], -1).to(q_nope.dtype)

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Cache-free causal attention over one whole sequence x (T, h)."""
        pos = torch.arange(x.shape[0], device=x.device)
        q_nope, q_pe = self.queries(x, pos)
        return self.o_proj(self.attend_expanded(q_nope, q_pe, self.latent(x, pos), 0))
