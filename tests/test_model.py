"""The hybrid model: config parsing, checkpoints with HF names, and the cached step against the
cache-free forward."""

import dataclasses
import json

import pytest
import torch

from prfaas.model.batch import CacheTensors, SeqInput
from prfaas.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from prfaas.model.config import PRESETS, ModelConfig, resolve_config
from prfaas.model.layers import SparseMoE
from prfaas.model.model import HybridForCausalLM
from prfaas.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

KIMI_CONFIG = {
    "model_type": "kimi_linear",
    "architectures": ["KimiLinearForCausalLM"],
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "linear_attn_config": {
        "num_heads": 32,
        "head_dim": 128,
        "short_conv_kernel_size": 4,
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)],
    },
    "intermediate_size": 9216,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1024,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}


def test_hf_config_of_the_released_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_CONFIG))
    cfg = resolve_config(str(tmp_path))
    assert cfg.full_attn_layers == (3, 7, 11, 15, 19, 23, 26)
    assert len(cfg.kda_layers) == 20 and len(cfg.mla_layers) == 7
    assert cfg.latent_dim == 576
    assert cfg.mla_bytes_per_token() == 7 * 1152  # ~7.9 KiB / token in bf16
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
    assert cfg.fingerprint() == PRESETS["kimi-linear-48b"].fingerprint()
    # 20 layers x 32 heads x 128 x 128 fp32 = 40 MiB of recurrent state
    assert cfg.kda_state_bytes() - 20 * 3 * 4096 * 3 * 2 == 40 * 2**20
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).fingerprint() == cfg.fingerprint()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict({**KIMI_CONFIG, "model_type": "llama"})
    with pytest.raises(ValueError, match="unknown model"):
        resolve_config("no-such-model")
    with pytest.raises(ValueError, match="full_attn_layers"):
        dataclasses.replace(PRESETS["tiny"], full_attn_layers=(99,))


def test_small_preset_size():
    with torch.device("meta"):
        n = HybridForCausalLM(PRESETS["small"]).num_parameters()
    assert 0.5e9 <= n <= 1.0e9


def test_checkpoint_names_follow_kimi_linear(tiny_model):
    sd = tiny_model.state_dict()
    cfg = tiny_model.config
    W, H = cfg.kda_width, cfg.kda_num_heads
    assert sd["model.layers.0.self_attn.q_conv1d.weight"].shape == (W, 1, 4)
    assert sd["model.layers.0.self_attn.A_log"].shape == (1, 1, H, 1)
    assert sd["model.layers.0.self_attn.dt_bias"].shape == (W,)
    assert sd["model.layers.0.self_attn.f_a_proj.weight"].shape == (
        cfg.kda_head_dim,
        cfg.hidden_size,
    )
    assert sd["model.layers.0.self_attn.o_norm.weight"].shape == (cfg.kda_head_dim,)
    assert "model.layers.0.mlp.gate_proj.weight" in sd
    m = cfg.mla_layers[0]
    assert sd[f"model.layers.{m}.self_attn.kv_a_proj_with_mqa.weight"].shape == (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        cfg.hidden_size,
    )
    assert f"model.layers.{m}.self_attn.kv_a_layernorm.weight" in sd
    assert "model.layers.1.block_sparse_moe.gate.e_score_correction_bias" in sd
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in sd
    assert "model.layers.1.block_sparse_moe.shared_experts.down_proj.weight" in sd
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(sd)


def test_checkpoint_round_trip(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    loaded = build_model(str(tmp_path))
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids), loaded(ids))
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_checkpoint_mismatch_is_a_clear_error(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_checkpoint(tiny_model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_checkpoint(tmp_path)


def _cache(cfg, num_blocks=64, block_size=16, slots=4):
    return CacheTensors(
        block_size,
        [torch.zeros(num_blocks, block_size, cfg.latent_dim) for _ in cfg.mla_layers],
        [
            torch.zeros(slots, cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_head_dim)
            for _ in cfg.kda_layers
        ],
        [
            torch.zeros(slots, 3, cfg.kda_width, cfg.short_conv_kernel_size - 1)
            for _ in cfg.kda_layers
        ],
    )


@pytest.mark.parametrize("use_nope", [True, False])
def test_step_matches_full_forward(use_nope):
    cfg = dataclasses.replace(PRESETS["tiny"], mla_use_nope=use_nope)
    model = HybridForCausalLM(cfg).init_weights(3).eval()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (50,), generator=g)
    b = torch.randint(0, 256, (21,), generator=g)
    with torch.no_grad():
        ref_a, ref_b = model(a[None])[0], model(b[None])[0]
        cache = _cache(cfg)
        bt_a, bt_b = [7, 3, 11, 0], [5, 9]
        # prefill chunks of both sequences in one step, then mixed prefill + decode steps
        out = model.step([SeqInput(a[:17], 0, bt_a, 1), SeqInput(b[:20], 0, bt_b, 2)], cache)
        torch.testing.assert_close(out[0], ref_a[16], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], ref_b[19], atol=2e-5, rtol=1e-5)
        out = model.step([SeqInput(a[17:40], 17, bt_a, 1), SeqInput(b[20:21], 20, bt_b, 2)], cache)
        torch.testing.assert_close(out[0], ref_a[39], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], ref_b[20], atol=2e-5, rtol=1e-5)
        for p in range(40, 50):  # decode token by token (absorbed MLA, recurrent KDA)
            out = model.step([SeqInput(a[p : p + 1], p, bt_a, 1)], cache)
            torch.testing.assert_close(out[0], ref_a[p], atol=2e-5, rtol=1e-5)


def test_mla_absorbed_equals_expanded(tiny_model):
    attn = tiny_model.model.layers[tiny_model.config.mla_layers[0]].self_attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, tiny_model.config.hidden_size, generator=g)
    pos = torch.arange(12)
    with torch.no_grad():
        lat = attn.latent(x, pos)
        qn, qp = attn.queries(x[-1:], pos[-1:])
        expanded = attn.attend_expanded(qn, qp, lat, 11)
        absorbed = attn.attend_absorbed(qn, qp, lat[None], torch.tensor([12]))
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_moe_matches_explicit_routing(tiny_model):
    moe = tiny_model.model.layers[1].block_sparse_moe
    assert isinstance(moe, SparseMoE)
    x = torch.randn(9, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = moe(x)
        scores = torch.sigmoid(x @ moe.gate.weight.T)
        ref = moe.shared_experts(x).clone()
        for t in range(9):
            top = torch.topk(scores[t] + moe.gate.e_score_correction_bias, moe.top_k).indices
            w = scores[t, top] / scores[t, top].sum() * moe.scaling
            for wi, e in zip(w, top.tolist(), strict=True):
                ref[t] += wi * moe.experts[e](x[t : t + 1])[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_tokenizers(tmp_path):
    bt = ByteTokenizer()
    assert bt.decode(bt.encode("héllo")) == "héllo"
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(str(tmp_path))
    assert isinstance(t, HFTokenizer)
    assert t.encode("hello world zebra") == [0, 1, 2]
