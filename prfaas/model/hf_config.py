"""Reading an HF ``kimi_linear`` config.json as transformers' ``KimiLinearConfig`` reads it.

Every field of that config is listed in ``TRANSFORMERS_FIELDS`` with what prfaas does with it
(tests check the list against the installed transformers). Aliases (``num_experts`` /
``num_local_experts``, ``num_expert_group`` / ``n_group``, ...) and defaults are transformers'.
Values prfaas does not implement raise ``ValueError`` naming the field. Torch-free.
"""

from __future__ import annotations

from typing import Any

# transformers' field -> what prfaas does with it
TRANSFORMERS_FIELDS: dict[str, str] = {
    "vocab_size": "read",
    "hidden_size": "read",
    "intermediate_size": "read",
    "moe_intermediate_size": "read",
    "num_hidden_layers": "read",
    "num_attention_heads": "read",
    "num_key_value_heads": "must equal num_attention_heads (MLA expands the latent per head)",
    "n_shared_experts": "read (alias num_shared_experts)",
    "output_router_logits": "training only: ignored",
    "routed_scaling_factor": "read",
    "kv_lora_rank": "read",
    "q_lora_rank": "must be null (no query compression)",
    "qk_rope_head_dim": "read",
    "v_head_dim": "read",
    "qk_nope_head_dim": "read",
    "n_group": "read (alias num_expert_group); group-limited top-k refused",
    "topk_group": "read; group-limited top-k refused",
    "num_experts_per_tok": "read (alias num_experts_per_token)",
    "norm_topk_prob": "read (alias moe_renormalize)",
    "hidden_act": "must be silu",
    "max_position_embeddings": "read (alias model_max_length)",
    "initializer_range": "training only: ignored",
    "rms_norm_eps": "read",
    "use_cache": "ignored (prfaas always caches)",
    "pad_token_id": "ignored (padding index of the embedding: training only)",
    "bos_token_id": "read",
    "eos_token_id": "read (a list: the first; stop tokens come from the tokenizer package)",
    "pretraining_tp": "training only: ignored",
    "tie_word_embeddings": "read",
    "attention_bias": "must be false",
    "attention_dropout": "training only: ignored",
    "num_local_experts": "read (alias num_experts)",
    "mlp_layer_types": "read; must be dense layers then sparse layers",
    "layer_types": "read (before linear_attn_config)",
    "linear_head_dim": "read (linear_attn_config.head_dim first)",
    "linear_num_heads": "read (linear_attn_config.num_heads first)",
    "linear_conv_kernel_dim": "read (linear_attn_config.short_conv_kernel_size first)",
}

_ALIASES: dict[str, tuple[str, ...]] = {
    "n_shared_experts": ("num_shared_experts", "n_shared_experts"),
    "n_group": ("num_expert_group", "n_group"),
    "num_experts_per_tok": ("num_experts_per_token", "num_experts_per_tok"),
    "norm_topk_prob": ("moe_renormalize", "norm_topk_prob"),
    "max_position_embeddings": ("max_position_embeddings", "model_max_length"),
    "num_local_experts": ("num_experts", "num_local_experts"),
}

_DEFAULTS: dict[str, Any] = {  # transformers' defaults (KimiLinearConfig 5.24)
    "vocab_size": 163840,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "moe_intermediate_size": 1024,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "num_local_experts": 256,
    "linear_head_dim": 128,
    "linear_num_heads": 32,
    "linear_conv_kernel_dim": 4,
}


# fields where an explicit null means "none" (transformers keeps it); elsewhere null = default
_NULLABLE = ("bos_token_id", "eos_token_id")


def _get(d: dict[str, Any], field: str) -> Any:
    if field in _NULLABLE and field in d:
        return d[field]
    for key in _ALIASES.get(field, (field,)):
        if d.get(key) is not None:
            return d[key]
    return _DEFAULTS.get(field)


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json: {field} = {value!r} is not supported by prfaas ({why})")


def _layer_types(d: dict[str, Any], n: int) -> list[str]:
    """transformers' precedence: ``layer_types`` > linear_attn_config's 1-based
    ``full_attn_layers`` and ``kda_layers`` (both present) > every 4th layer from layer 4."""
    types = d.get("layer_types")
    lin = d.get("linear_attn_config") or {}
    if types is None:
        if "full_attn_layers" in lin and "kda_layers" in lin:
            full = [int(i) for i in lin["full_attn_layers"]]
            kda = [int(i) for i in lin["kda_layers"]]
            bad = [i for i in full + kda if not 1 <= i <= n]
            if bad:
                raise ValueError(
                    f"config.json: linear_attn_config layers {bad} outside 1..{n} (1-based)"
                )
            both = sorted(set(full) & set(kda))
            if both:
                raise ValueError(
                    f"config.json: layers {both} are in full_attn_layers and kda_layers"
                )
            missing = sorted(set(range(1, n + 1)) - set(full) - set(kda))
            if missing:
                raise ValueError(
                    f"config.json: layers {missing} (1-based) are in neither full_attn_layers "
                    "nor kda_layers"
                )
            types = ["full_attention" if i + 1 in full else "linear_attention" for i in range(n)]
        else:
            types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    types = list(types)
    if len(types) != n or any(t not in ("full_attention", "linear_attention") for t in types):
        raise _refuse(
            "layer_types", types, f"{n} entries of 'full_attention' / 'linear_attention' expected"
        )
    return types


def _mlp_layers(d: dict[str, Any], n: int) -> int:
    """The number of leading dense layers (every later layer is MoE)."""
    kinds = d.get("mlp_layer_types")
    if kinds is None:
        k = d.get("first_k_dense_replace")
        return min(n, int(1 if k is None else k))
    kinds = list(kinds)
    k = next((i for i, t in enumerate(kinds) if t != "dense"), len(kinds))
    if len(kinds) != n or any(t != "sparse" for t in kinds[k:]):
        raise _refuse(
            "mlp_layer_types", kinds, f"{n} entries: 'dense' layers first, then 'sparse' layers"
        )
    return k


def read_hf_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The ``ModelConfig`` keyword arguments of an HF kimi_linear config dict."""
    n = int(_get(d, "num_hidden_layers"))
    heads = int(_get(d, "num_attention_heads"))
    if d.get("q_lora_rank") not in (None, 0):
        raise _refuse("q_lora_rank", d["q_lora_rank"], "Kimi Linear uses q_lora_rank null")
    kv_heads = d.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != heads:
        raise _refuse("num_key_value_heads", kv_heads, f"must equal num_attention_heads {heads}")
    if _get(d, "hidden_act") != "silu":
        raise _refuse("hidden_act", d.get("hidden_act"), "only silu")
    if _get(d, "attention_bias"):
        raise _refuse("attention_bias", d.get("attention_bias"), "projections have no bias")
    act = d.get("moe_router_activation_func")
    if act not in (None, "sigmoid"):
        raise _refuse("moe_router_activation_func", act, "the router is sigmoid")
    n_group, topk_group = int(_get(d, "n_group")), int(_get(d, "topk_group"))
    if n_group > 1 and topk_group < n_group:
        raise _refuse(
            "num_expert_group",
            n_group,
            f"group-limited top-k routing (topk_group {topk_group} of {n_group} groups) is not "
            "implemented; only num_expert_group 1 (or topk_group >= num_expert_group)",
        )
    types = _layer_types(d, n)
    first_dense = _mlp_layers(d, n)
    num_experts = int(_get(d, "num_local_experts") or 0) if first_dense < n else 0
    if first_dense < n and num_experts <= 0:
        raise _refuse("num_experts", num_experts, "MoE layers need experts")
    lin = d.get("linear_attn_config") or {}
    eos = _get(d, "eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return dict(
        vocab_size=int(_get(d, "vocab_size")),
        hidden_size=int(_get(d, "hidden_size")),
        num_hidden_layers=n,
        full_attn_layers=tuple(i for i, t in enumerate(types) if t == "full_attention"),
        rms_norm_eps=float(_get(d, "rms_norm_eps")),
        tie_word_embeddings=bool(_get(d, "tie_word_embeddings")),
        num_attention_heads=heads,
        kv_lora_rank=int(_get(d, "kv_lora_rank")),
        qk_nope_head_dim=int(_get(d, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_get(d, "qk_rope_head_dim")),
        v_head_dim=int(_get(d, "v_head_dim")),
        mla_use_nope=bool(d.get("mla_use_nope", True)),
        rope_theta=float(d.get("rope_theta") or 10000.0),
        kda_num_heads=int(lin.get("num_heads", _get(d, "linear_num_heads"))),
        kda_head_dim=int(lin.get("head_dim", _get(d, "linear_head_dim"))),
        short_conv_kernel_size=int(
            lin.get("short_conv_kernel_size", _get(d, "linear_conv_kernel_dim"))
        ),
        intermediate_size=int(_get(d, "intermediate_size")),
        num_experts=num_experts,
        num_experts_per_token=int(_get(d, "num_experts_per_tok")),
        num_shared_experts=int(_get(d, "n_shared_experts")),
        moe_intermediate_size=int(_get(d, "moe_intermediate_size")),
        moe_renormalize=bool(_get(d, "norm_topk_prob")),
        routed_scaling_factor=float(_get(d, "routed_scaling_factor")),
        first_k_dense_replace=first_dense,
        bos_token_id=_get(d, "bos_token_id"),
        eos_token_id=eos,
        max_position_embeddings=int(_get(d, "max_position_embeddings")),
    )
