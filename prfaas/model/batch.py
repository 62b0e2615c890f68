"""The contract between the engine and the model for one forward step over a batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqInput:
    """One sequence's share of a step: ``token_ids`` are new tokens at positions start..start+n-1."""

    token_ids: torch.Tensor  # (n,) int64
    start: int  # tokens of this sequence already in the cache
    block_table: list[int]  # physical MLA blocks covering positions [0, start + n)
    slot: int  # KDA recurrent / short-conv state slot


@dataclass
class CacheTensors:
    """The physical cache a step reads and writes (owned by prfaas.cache)."""

    block_size: int
    mla_kv: list[torch.Tensor]  # per MLA layer: (num_blocks, block_size, kv_lora_rank + rope)
    kda_state: list[torch.Tensor]  # per KDA layer: (num_slots, H, K, V) fp32
    conv_state: list[torch.Tensor]  # per KDA layer: (num_slots, 3, W, kernel - 1)
