"""What rank ``r`` of ``size`` holds: the sharding plan of the model's parameters and of its KV.

Parameters (HF Kimi Linear names, full shapes; every split is an even contiguous slice):

* KDA: ``q/k/v_proj``, the q/k/v convs, ``dt_bias``, ``f_b_proj``, ``g_b_proj`` (rows: the rank's
  heads), ``b_proj`` (rows: heads), ``A_log`` (its head dim); ``o_proj`` by columns (row-parallel,
  summed over the ranks); the low-rank ``f_a_proj`` / ``g_a_proj`` and the per-head ``o_norm``
  replicated. Each rank holds ``kda_num_heads / size`` whole heads.
* MLA: ``q_proj`` and ``kv_b_proj`` by rows (heads), ``o_proj`` by columns; ``kv_a_proj_with_mqa``
  and ``kv_a_layernorm`` replicated: the latent KV (``kv_lora_rank + qk_rope_head_dim`` per token)
  is computed on every rank and the MLA cache is replicated, as vLLM does for MLA.
* dense MLP: ``gate_proj`` / ``up_proj`` by rows, ``down_proj`` by columns.
* MoE: expert parallel: rank r holds experts ``[r E/size, (r+1) E/size)`` whole (local names
  ``experts.0..``); the router (``gate``) is replicated; the shared experts are split by width
  like the dense MLP.
* embedding, final norm, layer norms and ``lm_head``: replicated.

KV: the KDA recurrent state (H, K, V) and the short-conv state (3, W, k-1) of a rank are its heads'
(``H / size`` heads, ``W / size`` channels of each of q, k and v); the MLA latent rows are whole.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from prfaas.model.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(.*\.block_sparse_moe\.experts\.)(\d+)(\..*)$")

# (module path inside a layer, split dim) for the layer's parameters that are split; others are
# replicated. Keys are matched against the name after "model.layers.N.".
_KDA_SPLIT = {
    "self_attn.q_proj.weight": 0,
    "self_attn.k_proj.weight": 0,
    "self_attn.v_proj.weight": 0,
    "self_attn.q_conv1d.weight": 0,
    "self_attn.k_conv1d.weight": 0,
    "self_attn.v_conv1d.weight": 0,
    "self_attn.A_log": 2,
    "self_attn.dt_bias": 0,
    "self_attn.f_b_proj.weight": 0,
    "self_attn.b_proj.weight": 0,
    "self_attn.g_b_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
}
_MLA_SPLIT = {
    "self_attn.q_proj.weight": 0,
    "self_attn.kv_b_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
}
_MLP_SPLIT = {
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
    "block_sparse_moe.shared_experts.gate_proj.weight": 0,
    "block_sparse_moe.shared_experts.up_proj.weight": 0,
    "block_sparse_moe.shared_experts.down_proj.weight": 1,
}


def check_tp(cfg: ModelConfig, size: int) -> str | None:
    """Why ``cfg`` cannot be split over ``size`` ranks (one line), or None."""
    if size < 1:
        return f"tensor_parallel_size must be >= 1, got {size}"
    if size == 1:
        return None
    need = {
        "kda_num_heads": cfg.kda_num_heads if cfg.kda_layers else 0,
        "num_attention_heads": cfg.num_attention_heads if cfg.mla_layers else 0,
        "intermediate_size": cfg.intermediate_size
        if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        else 0,
        "num_experts": cfg.num_experts,
        "moe_intermediate_size * num_shared_experts": cfg.moe_intermediate_size
        * cfg.num_shared_experts
        if cfg.num_experts
        else 0,
    }
    bad = [f"{k} {v}" for k, v in need.items() if v % size]
    if bad:
        return f"tensor_parallel_size {size} does not divide {', '.join(bad)} of model {cfg.name!r}"
    return None


def kv_geometry(cfg: ModelConfig, size: int) -> ModelConfig:
    """The geometry a rank's cache tensors have: ``kda_num_heads / size`` heads (the MLA latent
    is whole). Only for shapes: its fingerprint is not the model's."""
    if size == 1:
        return cfg
    return dataclasses.replace(cfg, kda_num_heads=cfg.kda_num_heads // size)


def expert_range(cfg: ModelConfig, rank: int, size: int) -> tuple[int, int]:
    """The global ids [start, end) of the routed experts rank ``rank`` holds."""
    n = cfg.num_experts // size
    return rank * n, (rank + 1) * n


def split_dim(cfg: ModelConfig, name: str) -> int | None:
    """The dim a (non-expert) parameter is split along, None when replicated."""
    m = _LAYER.match(name)
    if m is None:
        return None
    rest = name[m.end() :]
    kind = cfg.layer_kind(int(m.group(1)))
    table = _KDA_SPLIT if kind == "kda" else _MLA_SPLIT
    if rest in table:
        return table[rest]
    return _MLP_SPLIT.get(rest)


def local_name(cfg: ModelConfig, name: str, rank: int, size: int) -> str | None:
    """The name of global parameter ``name`` in rank ``rank``'s model (routed experts are
    renumbered from 0), None when the rank does not hold it."""
    m = _EXPERT.match(name)
    if m is None or size == 1:
        return name
    start, end = expert_range(cfg, rank, size)
    e = int(m.group(2))
    if not start <= e < end:
        return None
    return f"{m.group(1)}{e - start}{m.group(3)}"


def shard_tensor(
    cfg: ModelConfig, name: str, full: torch.Tensor, rank: int, size: int
) -> tuple[str, torch.Tensor] | None:
    """(local name, the rank's slice of ``full``: a view) for global parameter ``name``, or None
    when the rank does not hold it."""
    lname = local_name(cfg, name, rank, size)
    if lname is None:
        return None
    d = split_dim(cfg, name) if size > 1 else None
    if d is None:
        return lname, full
    n = full.shape[d] // size
    return lname, full.narrow(d, rank * n, n)


# ----- KV -----------------------------------------------------------------------------------------
def kda_state_shard(state: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s heads of a full KDA recurrent state (..., H, K, V) -> (..., H/size, K, V)."""
    n = state.shape[-3] // size
    return state.narrow(-3, rank * n, n)


def kda_conv_shard(conv: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s channels of a full short-conv state (..., 3, W, k-1) -> (..., 3, W/size,
    k-1): the same heads' channels of each of q, k and v."""
    n = conv.shape[-2] // size
    return conv.narrow(-2, rank * n, n)


def kda_state_join(shards: list[torch.Tensor]) -> torch.Tensor:
    """The full recurrent state from every rank's shard (rank order)."""
    return torch.cat(shards, dim=-3)


def kda_conv_join(shards: list[torch.Tensor]) -> torch.Tensor:
    """The full short-conv state from every rank's shard (rank order)."""
    return torch.cat(shards, dim=-2)
