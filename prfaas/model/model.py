"""The hybrid decoder (KDA + MLA layers, dense MLP / MoE) with HF Kimi Linear parameter names.

Two entry points that compute the same function:
* ``forward(input_ids)`` — cache-free, whole sequences (the reference);
* ``step(seqs, cache)`` — one engine step over a batch of sequences, each adding any number of tokens
  on top of what the paged cache already holds (prefill chunks and single-token decodes mixed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model import kda_ops
from prfaas.model.batch import CacheTensors, SeqInput
from prfaas.model.config import ModelConfig
from prfaas.model.init_values import init_value
from prfaas.model.kda import KDAAttention
from prfaas.model.layers import DenseMLP, RMSNorm, SparseMoE, linear_fp32_out
from prfaas.model.mla import MLAAttention
from prfaas.model.tp.group import TPGroup
from prfaas.model.tp.shard import kv_geometry


@dataclass
class DecodeBatch:
    """Device tensors of a decode-only step with static shapes (B rows, L context columns), as a
    CUDA graph needs them. Rows with ``valid`` False are padding: they point at state slots and
    cache rows no valid row uses, and write back the values they read (the cache is unchanged)."""

    tokens: torch.Tensor  # (B,) the new token of each row
    slots: torch.Tensor  # (B,) KDA state slot, all distinct
    new_rows: torch.Tensor  # (B,) flat MLA cache row the new token writes, all distinct
    block_tables: torch.Tensor  # (B, NB) MLA blocks of positions 0..NB*block_size-1 (pad: any)
    lengths: torch.Tensor  # (B,) context length including the new token (position + 1), >= 1
    valid: torch.Tensor  # (B,) nonzero for real rows; they come first, padding rows trail


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.kind = cfg.layer_kind(i)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAAttention(cfg, tp) if self.kind == "mla" else KDAAttention(cfg, tp)
        if cfg.is_moe_layer(i):
            self.block_sparse_moe = SparseMoE(cfg, tp)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, tp)

    def mlp_out(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP (or MoE) of the already normalised h, without the residual."""
        return self.block_sparse_moe(h) if hasattr(self, "block_sparse_moe") else self.mlp(h)

    def ffn(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x + mlp(norm(x))``, the MLP's input in ``dtype`` (default x's)."""
        return x + self.mlp_out(self.post_attention_layernorm(x, dtype))

    def input_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, input_layernorm(x + delta))``: the previous layer's MLP residual fused
        with this layer's norm (``delta`` None: x as it is); the norm's output in ``dtype``
        (default x's), the sum in x's dtype."""
        if delta is None:
            return x, self.input_layernorm(x, dtype)
        return self.input_layernorm.add_forward(x, delta, dtype)


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class HybridForCausalLM(nn.Module):
    """``tp`` (a ``TPGroup`` of size > 1): the model of one tensor-parallel rank (its heads,
    MLP width and experts: :mod:`prfaas.model.tp.shard`); ``config`` stays the whole model's and
    ``kv_geometry`` is the geometry of the rank's cache tensors (``config`` without tp).

    Precision: the layers compute in the weights' dtype (bf16 when served), but the residual
    stream (embeddings plus every layer's output) is summed and carried in ``residual_dtype``
    (fp32 by default; the norms read it and hand each layer its input in the weights' dtype), and
    the logits come from a GEMM with fp32 output (``fp32_logits``). Both keep 16-bit rounding off
    what decides the next token for a few bytes per token: with a bf16 stream each of the 2 adds
    per layer rounds the sum, and a bf16 logit near 4 is known only to 0.016."""

    #: dtype of the residual stream; None: the weights' dtype (what transformers' kimi_linear
    #: does). Never narrower than the weights' dtype.
    residual_dtype: torch.dtype | None = torch.float32
    #: logits from an fp32-output GEMM; False: the weights' dtype, then widened to fp32
    fp32_logits: bool = True

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.kv_geometry = kv_geometry(cfg, tp.size) if self.tp is not None else cfg
        self.model = _Backbone(cfg, self.tp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # index of each layer within its kind (cache tensors are per kind)
        kinds = cfg.layer_kinds
        self._kind_index = [kinds[: i + 1].count(k) - 1 for i, k in enumerate(kinds)]

    # ----- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> HybridForCausalLM:
        """Random weights from a seed (fan-in scaled so that random logits are well spread), drawn
        on each parameter's device (one generator per device, seeded with ``seed``): a model on the
        CPU gets the same weights as ever; one built on a GPU gets its own draw without any host
        copy of the weights."""
        if self.tp is not None:  # the whole model's draws, each rank keeping its slices
            from prfaas.model.tp.weights import init_rank_weights

            init_rank_weights(self, seed)
            return self
        gens: dict[torch.device, torch.Generator] = {}
        for name, p in self.named_parameters():
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            vals = init_value(name, p.shape, gen, p.device)
            p.copy_(vals.to(p.dtype))
            del vals
        return self

    # ----- precision ----------------------------------------------------------------------------
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(the layers' compute dtype: the weights', the residual stream's dtype)."""
        cdt = self.model.embed_tokens.weight.dtype
        if self.residual_dtype is None:
            return cdt, cdt
        return cdt, torch.promote_types(cdt, self.residual_dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output h (N, hidden) -> (N, vocab) fp32 logits."""
        if self.fp32_logits:
            return linear_fp32_out(h, self.lm_head.weight)
        return self.lm_head(h).float()

    # ----- cache-free reference -----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), no cache (every sequence from position 0)."""
        cdt, rdt = self.dtypes()
        x = self.model.embed_tokens(input_ids).to(rdt)
        B, T, _ = x.shape
        for layer in self.model.layers:
            h = layer.input_layernorm(x, cdt)
            if layer.kind == "kda":
                a, _, _ = layer.self_attn(h, None, None)
            else:
                a = torch.stack([layer.self_attn.forward_full(h[b]) for b in range(B)])
            x = layer.ffn(x + a, cdt)
        return self.logits(self.model.norm(x, cdt))

    # ----- one engine step ----------------------------------------------------------------------
    def step(
        self,
        seqs: list[SeqInput],
        cache: CacheTensors,
        layer_callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run the new tokens of every sequence through the model, reading and updating ``cache``.
        Returns the logits of each sequence's last new token: (len(seqs), vocab) fp32.
        ``layer_callback(i)`` runs once layer i's cache entries are written (layer-wise streaming)."""
        if not seqs:
            raise ValueError("step() needs at least one sequence")
        dev = self.lm_head.weight.device
        bs = cache.block_size
        lens = [int(s.token_ids.numel()) for s in seqs]
        if min(lens) < 1:
            raise ValueError("every sequence in a step needs at least one new token")
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        dec = [i for i, s in enumerate(seqs) if lens[i] == 1 and s.start > 0]
        dec_set = set(dec)
        pre = [i for i in range(len(seqs)) if i not in dec_set]
        # Index tensors are built on the CPU and moved in one copy: the flat cache row (block *
        # block_size + offset) of every position each sequence reads, the rows the new tokens write,
        # and the new tokens' positions.
        rows_cpu = []
        for s, n in zip(seqs, lens, strict=True):
            if len(s.block_table) * bs < s.start + n:
                raise ValueError(
                    f"block table covers {len(s.block_table) * bs} positions, "
                    f"sequence needs {s.start + n}"
                )
            nb = -(-(s.start + n) // bs)  # every row of the blocks in use, cut at the last one
            bt = torch.as_tensor(s.block_table[:nb], dtype=torch.long)
            rows_cpu.append((bt[:, None] * bs + torch.arange(bs)).view(-1)[: s.start + n])
        new_rows = torch.cat([r[s.start :] for r, s in zip(rows_cpu, seqs, strict=True)])
        positions = torch.cat(
            [torch.arange(s.start, s.start + n) for s, n in zip(seqs, lens, strict=True)]
        )
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long)
        last = torch.tensor([o - 1 for o in offs[1:]], dtype=torch.long)
        parts = [torch.cat([s.token_ids for s in seqs]), new_rows, positions, slots, last]
        parts += [rows_cpu[i] for i in pre]  # the rows each prefill's attention reads
        w = self.lm_head.weight
        fused = bool(dec) and kda_ops.fused_available(w)
        if dec:
            dec_len = torch.tensor([seqs[i].start + 1 for i in dec])
            if fused:  # block tables: the paged kernel reads the latents in place
                nb = [seqs[i].start // bs + 1 for i in dec]
                dec_rows = torch.zeros(len(dec), max(nb), dtype=torch.long)
                for j, i in enumerate(dec):
                    dec_rows[j, : nb[j]] = torch.as_tensor(seqs[i].block_table[: nb[j]])
            else:  # the flat row of every position, padded
                dec_rows = torch.zeros(len(dec), int(dec_len.max()), dtype=torch.long)
                for j, i in enumerate(dec):
                    dec_rows[j, : rows_cpu[i].numel()] = rows_cpu[i]
            parts += [dec_len, dec_rows.view(-1), torch.tensor([offs[i] for i in dec])]
        sizes = [t.numel() for t in parts]
        # one copy before the first kernel: nothing after it waits for the GPU
        moved = torch.cat(parts).to(dev, non_blocking=True).split(sizes)
        tokens, new_rows, positions, slots, last = moved[:5]
        pre_rows = dict(zip(pre, moved[5 : 5 + len(pre)], strict=True))
        if dec:
            m = 5 + len(pre)
            dec_len, dec_rows, dec_idx = moved[m], moved[m + 1].view(len(dec), -1), moved[m + 2]
            dec_slots = slots[dec_idx.new_tensor(dec)]
            dec_pos = dec_len - 1
        cdt, rdt = self.dtypes()
        x = self.model.embed_tokens(tokens).to(rdt)
        if fused:
            dec_valid = torch.ones_like(dec_slots)
            dec_cu = torch.arange(len(dec) + 1, device=dev)

        delta = None
        whole = not dec and len(pre) == 1  # one prefill: its outputs are the layer's outputs
        for li, layer in enumerate(self.model.layers):
            x, h = layer.input_norm(x, delta, cdt)
            out = torch.empty_like(h) if pre and not whole else None
            ki = self._kind_index[li]
            attn = layer.self_attn
            if layer.kind == "kda":
                st_all, cv_all = cache.kda_state[ki], cache.conv_state[ki]
                if dec:
                    if fused:
                        o = attn.decode_slots(
                            h[dec_idx], st_all, cv_all, dec_slots, dec_valid, dec_cu
                        )
                    else:
                        o, st, cv = attn(
                            h[dec_idx][:, None, :], st_all[dec_slots], cv_all[dec_slots]
                        )
                        st_all[dec_slots] = st
                        cv_all[dec_slots] = cv.to(cv_all.dtype)
                        o = o[:, 0]
                    if out is None:
                        out = o
                    else:
                        out[dec_idx] = o
                for i in pre:
                    sl = seqs[i].slot
                    o, st, cv = attn(
                        h[offs[i] : offs[i + 1]][None], st_all[sl : sl + 1], cv_all[sl : sl + 1]
                    )
                    st_all[sl] = st[0]
                    cv_all[sl] = cv[0].to(cv_all.dtype)
                    if whole:
                        out = o[0]
                    else:
                        out[offs[i] : offs[i + 1]] = o[0]
            else:
                flat = cache.mla_kv[ki].view(-1, cache.mla_kv[ki].shape[-1])
                flat[new_rows] = attn.latent(h, positions).to(flat.dtype)  # all new tokens at once
                if dec:
                    hd = h[dec_idx]
                    q_nope, q_pe = attn.queries(hd, dec_pos)
                    if fused:
                        o = attn.attend_paged(q_nope, q_pe, flat, dec_rows, dec_len, bs)
                    else:
                        o = attn.attend_absorbed(q_nope, q_pe, flat[dec_rows], dec_len)
                    o = attn.o_proj(o.to(h.dtype))
                    if out is None:
                        out = o
                    else:
                        out[dec_idx] = o
                for i in pre:
                    hs = h[offs[i] : offs[i + 1]]
                    q_nope, q_pe = attn.queries(hs, positions[offs[i] : offs[i + 1]])
                    lat = flat[pre_rows[i]].to(hs.dtype)
                    o = attn.o_proj(attn.attend_expanded(q_nope, q_pe, lat, seqs[i].start))
                    if whole:
                        out = o
                    else:
                        out[offs[i] : offs[i + 1]] = o
            if layer_callback is not None:
                layer_callback(li)
            x, h = layer.post_attention_layernorm.add_forward(x, out, cdt)
            delta = layer.mlp_out(h)
        return self.logits(self.model.norm((x + delta)[last], cdt))

    # ----- decode with static shapes (CUDA-graph capturable) -----------------------------------
    def decode(self, b: DecodeBatch, cache: CacheTensors) -> torch.Tensor:
        """One decode token per row; no host synchronisation and no host-to-device copies, so it
        can be captured in a CUDA graph (MoE layers too: on CUDA they run ``moe_ops``, which never
        syncs; the CPU reference loop does). Computes what
        ``step`` computes for decode rows. Returns (B, vocab) fp32 logits."""
        cdt, rdt = self.dtypes()
        x = self.model.embed_tokens(b.tokens).to(rdt)
        pos = b.lengths - 1
        keep = b.valid.bool()[:, None]
        bs = cache.block_size
        arange = torch.arange(bs, device=x.device)
        fused = kda_ops.fused_available(x)
        if not fused:
            rows = (b.block_tables[:, :, None] * bs + arange).view(b.block_tables.shape[0], -1)
        if fused:  # padding rows trail: they get zero tokens and write no state
            cu = F.pad(b.valid.cumsum(0), (1, 0))
        delta = None
        for li, layer in enumerate(self.model.layers):
            x, h = layer.input_norm(x, delta, cdt)
            ki = self._kind_index[li]
            attn = layer.self_attn
            if layer.kind == "kda" and fused:
                st_all, cv_all = cache.kda_state[ki], cache.conv_state[ki]
                out = attn.decode_slots(h, st_all, cv_all, b.slots, b.valid, cu)
            elif layer.kind == "kda":
                st_all, cv_all = cache.kda_state[ki], cache.conv_state[ki]
                st_old, cv_old = st_all[b.slots], cv_all[b.slots]
                o, st, cv = attn(h[:, None, :], st_old, cv_old)
                st_all[b.slots] = torch.where(keep[:, :, None, None], st, st_old)
                cv_all[b.slots] = torch.where(keep[:, :, None, None], cv.to(cv_all.dtype), cv_old)
                out = o[:, 0]
            else:
                flat = cache.mla_kv[ki].view(-1, cache.mla_kv[ki].shape[-1])
                lat = attn.latent(h, pos).to(flat.dtype)
                flat[b.new_rows] = torch.where(keep, lat, flat[b.new_rows])
                q_nope, q_pe = attn.queries(h, pos)
                if fused:  # the paged kernel reads the latents where they lie
                    o = attn.attend_paged(q_nope, q_pe, flat, b.block_tables, b.lengths, bs)
                else:
                    o = attn.attend_absorbed(q_nope, q_pe, flat[rows], b.lengths)
                out = attn.o_proj(o.to(h.dtype))
            x, h = layer.post_attention_layernorm.add_forward(x, out, cdt)
            delta = layer.mlp_out(h)
        return self.logits(self.model.norm.add_forward(x, delta, cdt)[1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
