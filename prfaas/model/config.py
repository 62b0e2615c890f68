"""Model configuration: the geometry of a Kimi-Linear-style hybrid (KDA + MLA) decoder.

Reads an HF ``config.json`` with ``model_type: "kimi_linear"`` and provides named presets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prfaas.model.hf_config import read_hf_fields


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    # 0-based indices of the MLA (full attention) layers; every other layer is KDA
    full_attn_layers: tuple[int, ...]
    rms_norm_eps: float = 1e-5
    # the MLA latent norm: transformers' kimi_linear (and the remote code) build it with the
    # RMSNorm default 1e-6, not rms_norm_eps
    kv_a_layernorm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # MLA
    num_attention_heads: int = 32
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    rope_theta: float = 10000.0
    # KDA
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4
    # MLP / MoE
    intermediate_size: int = 9216
    num_experts: int = 0  # 0 = dense MLP everywhere
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    moe_renormalize: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1  # the first k layers use the dense MLP
    # special tokens
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    max_position_embeddings: int = 1 << 20
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.hidden_size > 0 or not self.num_hidden_layers > 0 or not self.vocab_size > 0:
            raise ValueError("hidden_size, num_hidden_layers and vocab_size must be positive")
        bad = [i for i in self.full_attn_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"full_attn_layers {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.num_experts and self.num_experts_per_token > self.num_experts:
            raise ValueError("num_experts_per_token exceeds num_experts")

    # ----- derived geometry -------------------------------------------------------------------
    def layer_kind(self, i: int) -> str:
        return "mla" if i in self.full_attn_layers else "kda"

    @property
    def layer_kinds(self) -> list[str]:
        return [self.layer_kind(i) for i in range(self.num_hidden_layers)]

    @property
    def mla_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.layer_kind(i) == "mla"]

    @property
    def kda_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.layer_kind(i) == "kda"]

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.first_k_dense_replace

    @property
    def latent_dim(self) -> int:
        """Values cached per token per MLA layer (compressed KV + rope key)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kda_width(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    def mla_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return len(self.mla_layers) * self.latent_dim * dtype_bytes

    def kda_state_bytes(self, conv_dtype_bytes: int = 2) -> int:
        """Fixed per-request bytes of KDA recurrent (fp32) and short-conv state, all KDA layers."""
        rec = self.kda_num_heads * self.kda_head_dim * self.kda_head_dim * 4
        conv = 3 * self.kda_width * (self.short_conv_kernel_size - 1) * conv_dtype_bytes
        return len(self.kda_layers) * (rec + conv)

    def fingerprint(self) -> str:
        """A hash of everything that shapes the cache and the math: both ends of a transfer must agree."""
        d = dataclasses.asdict(self)
        d.pop("extra", None)
        d.pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ----- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "hf") -> ModelConfig:
        """Parse an HF ``kimi_linear`` config.json the way transformers' ``KimiLinearConfig``
        reads it (its field aliases, defaults and layer-type precedence); fields whose values
        prfaas does not implement are refused with a ValueError naming the field."""
        mt = d.get("model_type")
        if mt != "kimi_linear":
            raise ValueError(f"unsupported model_type {mt!r}: expected 'kimi_linear'")
        return cls(name=name, **read_hf_fields(d))

    def to_hf_dict(self) -> dict[str, Any]:
        kda_heads = self.kda_num_heads
        return {
            "model_type": "kimi_linear",
            "architectures": ["KimiLinearForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "q_lora_rank": None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "mla_use_nope": self.mla_use_nope,
            "rope_theta": self.rope_theta,
            "linear_attn_config": {
                "kda_layers": [i + 1 for i in self.kda_layers],
                "full_attn_layers": [i + 1 for i in self.full_attn_layers],
                "num_heads": kda_heads,
                "head_dim": self.kda_head_dim,
                "short_conv_kernel_size": self.short_conv_kernel_size,
            },
            "intermediate_size": self.intermediate_size,
            "num_experts": self.num_experts,
            "num_experts_per_token": self.num_experts_per_token,
            "num_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_renormalize": self.moe_renormalize,
            "moe_router_activation_func": "sigmoid",
            "routed_scaling_factor": self.routed_scaling_factor,
            "first_k_dense_replace": self.first_k_dense_replace,
            "mlp_layer_types": [
                "sparse" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)
            ],
            "max_position_embeddings": self.max_position_embeddings,
            "use_grouped_topk": True,
            "num_expert_group": 1,
            "topk_group": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_hf_dict(json.loads(p.read_text()), name=p.parent.name)


def _pattern(n_layers: int, every: int = 4) -> tuple[int, ...]:
    """0-based MLA layers for a 3:1 KDA:MLA pattern (every 4th layer, and the last one)."""
    full = {i for i in range(every - 1, n_layers, every)} | {n_layers - 1}
    return tuple(sorted(full))


# byte-level tokenizer: 256 bytes + BOS + EOS, padded to a round vocab
_BYTE_VOCAB = 384

PRESETS: dict[str, ModelConfig] = {
    # CPU tests: 8 layers (6 KDA + 2 MLA), MoE in layers 1.., hidden 128
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=_BYTE_VOCAB,
        hidden_size=128,
        num_hidden_layers=8,
        full_attn_layers=(3, 7),
        num_attention_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        mla_use_nope=True,
        kda_num_heads=2,
        kda_head_dim=32,
        intermediate_size=256,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_intermediate_size=64,
        routed_scaling_factor=2.446,
        first_k_dense_replace=1,
        bos_token_id=256,
        eos_token_id=257,
    ),
    # GPU work: dense, ~0.93B parameters, 16 layers (12 KDA + 4 MLA)
    "small": ModelConfig(
        name="small",
        vocab_size=32768,
        hidden_size=2048,
        num_hidden_layers=16,
        full_attn_layers=(3, 7, 11, 15),
        num_attention_heads=16,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        kda_num_heads=16,
        kda_head_dim=128,
        intermediate_size=5632,
        num_experts=0,
        bos_token_id=256,
        eos_token_id=257,
    ),
    # the released Kimi-Linear-48B-A3B geometry (shared/kimi-linear.md)
    "kimi-linear-48b": ModelConfig(
        name="kimi-linear-48b",
        vocab_size=163840,
        hidden_size=2304,
        num_hidden_layers=27,
        full_attn_layers=tuple(i - 1 for i in (4, 8, 12, 16, 20, 24, 27)),
        num_attention_heads=32,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        kda_num_heads=32,
        kda_head_dim=128,
        intermediate_size=9216,
        num_experts=256,
        num_experts_per_token=8,
        num_shared_experts=1,
        moe_intermediate_size=1024,
        routed_scaling_factor=2.446,
        first_k_dense_replace=1,
        bos_token_id=163584,  # [BOS]
        eos_token_id=163586,  # <|im_end|>
    ),
}


def resolve_config(model: str | ModelConfig) -> ModelConfig:
    """A preset name, a model directory / config.json path, or a ModelConfig."""
    if isinstance(model, ModelConfig):
        return model
    if model in PRESETS:
        return PRESETS[model]
    p = Path(model)
    if p.exists():
        return ModelConfig.from_json(p)
    raise ValueError(
        f"unknown model {model!r}: expected a preset ({', '.join(PRESETS)}) or a model directory"
    )
