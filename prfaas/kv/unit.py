"""The export/import unit: what crosses between nodes for one request (the engine exports it, the
transfer layer ships it, the decode engine imports it).

A request's cache is sent as a header plus one part per model layer, so a prefill node can stream
layer ``i`` while layer ``i + 1`` is still computing:

* an MLA layer part carries the latent KV of the tokens ``[token_start, token_end)`` (the uncached tail),
  tensor ``"kv"`` of shape ``(token_end - token_start, kv_lora_rank + qk_rope_head_dim)``;
* a KDA layer part carries the recurrent state at the end of the prefill, ``"state"`` of shape
  ``(num_heads, head_dim, head_dim)`` (fp32), and the short-conv state ``"conv"`` of shape
  ``(3, num_heads * head_dim, conv_kernel - 1)`` (q, k, v convs).

The tokens before ``token_start`` are the prefix the receiver already holds (its own prefix cache);
``token_end`` is the prompt length - 1: as in vLLM's disaggregated serving, the decode node computes the
last prompt token itself (so it samples the first output token, and nothing sampled needs to travel).
``prefix_hashes`` is the hash chain of the full blocks of the whole prompt so the receiver can check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerPart:
    """The cache of one model layer for one request."""

    layer: int  # 0-based model layer index
    kind: str  # "mla" or "kda"
    tensors: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class TransferHeader:
    """Describes a request's cache before any layer data arrives."""

    request_id: str
    model_fingerprint: str  # ModelConfig.fingerprint(): both ends must run the same model
    num_layers: int
    layer_kinds: list[str]  # "mla" / "kda" per layer, len == num_layers
    token_start: int  # first token whose MLA KV is carried
    token_end: int  # == prompt length - 1
    prompt_token_ids: list[int]
    prefix_hashes: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # free-form (sampling params, timings)


@dataclass
class KVExport:
    """A whole request's exported cache: the header and one part per layer (in layer order)."""

    header: TransferHeader
    parts: list[LayerPart]

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)
