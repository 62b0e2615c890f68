"""Test helpers that write the files of a Kimi Linear release directory themselves (nothing is
downloaded): a tiny random checkpoint in the release format (config.json field names, tensor
names as released), a small tiktoken BPE (``tiktoken.model``), ``tokenizer_config.json`` with
special tokens and a chat template, and ``generation_config.json``."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

# the release's split pattern (shared/kimi-linear.md), written out here so the tests pin it
KIMI_PAT = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

TRAIN_TEXT = (
    "the quick brown fox jumps over the lazy dog. The dog's owner said: hello world! "
    "hello there, hello again. 12345 678 90. café naïve résumé. 中文 你好 世界 中文 你好. "
    "assistant user system message the the the hello hello world world "
)

# merges beyond the learnt ones: half of a 3-byte character (streaming must hold it back) and
# a token across Han and Latin that Kimi's pattern never lets BPE use
EXTRA_TOKENS = [b"\xe2\x82", "文a".encode()]

# specials right after the base vocabulary, as in the release (its ids come from
# added_tokens_decoder; 256 reserved ids follow the base vocabulary)
SPECIALS = [
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]
NUM_RESERVED = 256

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}<|im_end|>"
    "{%- else -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def train_bpe(text: str, n_merges: int) -> list[bytes]:
    """Token byte strings in rank order: the 256 bytes, then greedy pair merges learnt on
    ``text`` split at spaces, then ``EXTRA_TOKENS``."""
    vocab = [bytes([b]) for b in range(256)]
    words = [[bytes([b]) for b in w.encode()] for w in text.replace(" ", "  ").split(" ") if w]
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:], strict=False))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        vocab.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    for t in EXTRA_TOKENS:
        if t not in vocab:
            vocab.append(t)
    return vocab


def write_tokenizer_files(d: Path, n_merges: int = 60) -> dict:
    """tiktoken.model + tokenizer_config.json; returns {"n_base", "specials": {text: id}}."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = train_bpe(TRAIN_TEXT, n_merges)
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(vocab)]
    (d / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(vocab)
    specials = {s: n + i for i, s in enumerate(SPECIALS)}
    decoder = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s, i in specials.items()
    }
    cfg = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIALS[2:],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": f"<|reserved_token_{n + NUM_RESERVED - 1}|>",
        "unk_token": f"<|reserved_token_{n + NUM_RESERVED - 2}|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return {"n_base": n, "specials": specials, "vocab": vocab}


def release_config(vocab_size: int, **over) -> dict:
    """config.json of a tiny model, field names as in the release (4 KDA + 2 MLA layers, MoE with
    8 experts from layer 2)."""
    cfg = {
        "model_type": "kimi_linear",
        "architectures": ["KimiLinearForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "mla_use_nope": True,
        "linear_attn_config": {
            "num_heads": 2,
            "head_dim": 32,
            "short_conv_kernel_size": 4,
            "full_attn_layers": [3, 6],
            "kda_layers": [1, 2, 4, 5],
        },
        "intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_token": 2,
        "num_shared_experts": 1,
        "moe_intermediate_size": 32,
        "moe_router_activation_func": "sigmoid",
        "moe_renormalize": True,
        "routed_scaling_factor": 2.446,
        "use_grouped_topk": True,
        "num_expert_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "model_max_length": 1048576,
        "bos_token_id": vocab_size - NUM_RESERVED,
        "eos_token_id": vocab_size - NUM_RESERVED + 2,
        "pad_token_id": vocab_size - 1,
        "torch_dtype": "bfloat16",
    }
    cfg.update(over)
    return cfg


def release_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released tensor names and shapes (shared/kimi-linear.md), scaled
    so that activations stay O(1); the score-correction bias is as large as the score spread,
    so that it changes which experts are chosen."""
    g = torch.Generator().manual_seed(seed)
    h, V = cfg["hidden_size"], cfg["vocab_size"]
    lin = cfg["linear_attn_config"]
    H, D = lin["num_heads"], lin["head_dim"]
    W = H * D
    nh, nope, rope, vd = (
        cfg["num_attention_heads"],
        cfg["qk_nope_head_dim"],
        cfg["qk_rope_head_dim"],
        cfg["v_head_dim"],
    )
    r = cfg["kv_lora_rank"]
    E, mi = cfg["num_experts"], cfg["moe_intermediate_size"]

    def lin_w(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, generator=g) / i**0.5

    def norm_w(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=g)

    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(V, h, generator=g),
        "model.norm.weight": norm_w(h),
        "lm_head.weight": lin_w(V, h),
    }
    full = set(lin["full_attn_layers"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_w(h)
        t[p + "post_attention_layernorm.weight"] = norm_w(h)
        a = p + "self_attn."
        if i + 1 in full:
            t[a + "q_proj.weight"] = lin_w(nh * (nope + rope), h)
            t[a + "kv_a_proj_with_mqa.weight"] = lin_w(r + rope, h)
            t[a + "kv_a_layernorm.weight"] = norm_w(r)
            t[a + "kv_b_proj.weight"] = lin_w(nh * (nope + vd), r)
            t[a + "o_proj.weight"] = lin_w(h, nh * vd)
        else:
            for x in "qkv":
                t[a + f"{x}_proj.weight"] = lin_w(W, h)
                t[a + f"{x}_conv1d.weight"] = torch.randn(W, 1, 4, generator=g) * 0.5
            t[a + "A_log"] = torch.log(torch.empty(1, 1, H, 1).uniform_(1, 16, generator=g))
            t[a + "dt_bias"] = 0.5 * torch.randn(W, generator=g)
            t[a + "f_a_proj.weight"] = lin_w(D, h)
            t[a + "f_b_proj.weight"] = lin_w(W, D)
            t[a + "b_proj.weight"] = lin_w(H, h)
            t[a + "g_a_proj.weight"] = lin_w(D, h)
            t[a + "g_b_proj.weight"] = lin_w(W, D)
            t[a + "o_norm.weight"] = norm_w(D)
            t[a + "o_proj.weight"] = lin_w(h, W)
        if i < cfg["first_k_dense_replace"]:
            m = p + "mlp."
            t[m + "gate_proj.weight"] = lin_w(cfg["intermediate_size"], h)
            t[m + "up_proj.weight"] = lin_w(cfg["intermediate_size"], h)
            t[m + "down_proj.weight"] = lin_w(h, cfg["intermediate_size"])
        else:
            m = p + "block_sparse_moe."
            t[m + "gate.weight"] = lin_w(E, h)
            t[m + "gate.e_score_correction_bias"] = 0.3 * torch.randn(E, generator=g)
            for e in range(E):
                t[m + f"experts.{e}.w1.weight"] = lin_w(mi, h)
                t[m + f"experts.{e}.w2.weight"] = lin_w(h, mi)
                t[m + f"experts.{e}.w3.weight"] = lin_w(mi, h)
            si = mi * cfg["num_shared_experts"]
            t[m + "shared_experts.gate_proj.weight"] = lin_w(si, h)
            t[m + "shared_experts.up_proj.weight"] = lin_w(si, h)
            t[m + "shared_experts.down_proj.weight"] = lin_w(h, si)
    return t


def write_release_dir(
    d: Path, seed: int = 0, stop_ids: list[int] | None = None, **config_over
) -> dict:
    """A whole release-format directory: tokenizer files, config.json, model.safetensors and
    generation_config.json (``stop_ids``: its eos_token_id list; default: <|im_end|>, [EOS]).
    Returns the tokenizer facts of ``write_tokenizer_files`` plus "config"."""
    tok = write_tokenizer_files(d)
    V = tok["n_base"] + NUM_RESERVED
    cfg = release_config(V, **config_over)
    sp = tok["specials"]
    cfg["bos_token_id"], cfg["eos_token_id"] = sp["[BOS]"], sp["<|im_end|>"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(release_tensors(cfg, seed), str(d / "model.safetensors"), metadata={"format": "pt"})
    stops = stop_ids if stop_ids is not None else [sp["<|im_end|>"], sp["[EOS]"]]
    gen = {"bos_token_id": sp["[BOS]"], "eos_token_id": stops, "do_sample": False}
    (d / "generation_config.json").write_text(json.dumps(gen))
    return {**tok, "config": cfg}
