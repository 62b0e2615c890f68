"""Parity with transformers' own ``kimi_linear`` (imported, a test dependency) on a tiny random
checkpoint written in the release format: logits, greedy generation through the engine (paged
cache, chunked prefill at several token budgets), and the float32 router and decay parameters of
a bfloat16 load."""

from __future__ import annotations

import json

import pytest
import torch
from kimi_files import write_release_dir
from safetensors.torch import load_file, save_file

from prfaas.engine import EngineConfig, LLMEngine, SamplingParams
from prfaas.model.checkpoint import load_checkpoint
from prfaas.model.config import ModelConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi-release")
    info = write_release_dir(d, seed=0)
    hf, loading = transformers.KimiLinearForCausalLM.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True
    )
    assert not any(loading.values()), loading  # transformers took every release tensor
    return d, info, hf.eval(), load_checkpoint(d)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_transformers(release):
    d, info, hf, ours = release
    ids = torch.randint(0, info["n_base"], (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert _rel(got, ref) < 1e-4


def test_score_correction_bias_changes_routing(release):
    d, info, hf, ours = release
    seen = {}
    moe = ours.model.layers[1].block_sparse_moe
    h = moe.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].reshape(-1, 64)))
    ids = torch.randint(0, info["n_base"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours(ids)
        h.remove()
        x = seen["x"]
        scores = torch.sigmoid(x @ moe.gate.weight.T)
        plain = torch.topk(scores, moe.top_k).indices.sort(-1).values
        chosen = moe.route(x)[1].sort(-1).values
        hf_chosen = hf.model.layers[1].mlp.gate(x)[2].sort(-1).values
    assert torch.equal(chosen, hf_chosen)
    changed = (chosen != plain).any(-1).sum().item()
    assert changed >= 5, f"the bias changed the experts of only {changed} of 40 tokens"


N_NEW = 10


@pytest.fixture(scope="module")
def hf_greedy(release):
    """Three prompts and transformers' greedy continuations (computed once for the module)."""
    d, info, hf, ours = release
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, info["n_base"], (n,), generator=g).tolist() for n in (37, 9, 20)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False
            )
            expected.append(out[0, len(p) :].tolist())
    return prompts, expected


@pytest.mark.parametrize("budget", [5, 16, 64])
def test_engine_greedy_matches_transformers_generate(release, hf_greedy, budget):
    d, info, hf, ours = release
    prompts, expected = hf_greedy
    stops = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    n_new = N_NEW
    eng = LLMEngine(
        EngineConfig(
            model=str(d),
            device="cpu",
            dtype="float32",
            max_num_batched_tokens=budget,
            block_size=8,
            checkpoint_interval=16,
            max_model_len=128,
        ),
        model=ours,
    )
    # the stop list of generation_config.json, which transformers' generate reads too
    assert set(stops) <= eng.stop_ids
    params = SamplingParams(temperature=0.0, max_tokens=n_new)
    rids = [eng.add_request(p, params) for p in prompts]
    done = {}
    for _ in range(500):
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
        if not eng.has_unfinished():
            break
    assert [done[r] for r in rids] == expected
    assert sum(len(e) for e in expected) >= 2 * n_new  # real continuations, not an early stop


def _near_tie_dir(tmp_path):
    """A checkpoint whose router scores nearly tie and whose score-correction biases differ by
    1e-3 around 1.0: float32 keeps the bias order, bfloat16 (spacing 2^-7 there) collapses it."""
    info = write_release_dir(tmp_path, seed=3)
    f = tmp_path / "model.safetensors"
    t = load_file(str(f))
    g = torch.Generator().manual_seed(4)
    for i in range(1, info["config"]["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe.gate."
        t[p + "weight"] = 1e-4 * torch.randn(t[p + "weight"].shape, generator=g)
        t[p + "e_score_correction_bias"] = 1.0 + 1e-3 * torch.randperm(8, generator=g).float()
    save_file(t, str(f), metadata={"format": "pt"})
    return info


def test_bf16_load_keeps_router_and_decay_params_fp32(tmp_path):
    info = _near_tie_dir(tmp_path)
    m = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    kinds = {}
    for name, p in m.named_parameters():
        fp32 = name.endswith((".gate.weight", ".e_score_correction_bias", ".A_log", ".dt_bias"))
        kinds.setdefault(fp32, set()).add(p.dtype)
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert kinds[True] == {torch.float32} and kinds[False] == {torch.bfloat16}
    hf = transformers.KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    moe = m.model.layers[1].block_sparse_moe
    bias = moe.gate.e_score_correction_bias
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        w, idx = moe.route(x)
        _, hf_w, hf_idx = hf.model.layers[1].mlp.gate(x)
        top_bias = torch.topk(bias, moe.top_k).indices.sort().values
        bf16_bias = bias.bfloat16().float()
        scores = torch.sigmoid(x.float() @ moe.gate.weight.T)
        collapsed = torch.topk(scores + bf16_bias, moe.top_k).indices.sort(-1).values
    # float32 bias: every token takes the experts with the largest bias, as transformers does
    assert torch.equal(idx.sort(-1).values, top_bias.expand(32, -1))
    assert torch.equal(idx.sort(-1).values, hf_idx.sort(-1).values)
    order = idx.argsort(-1)
    torch.testing.assert_close(
        w.gather(-1, order), hf_w.gather(-1, hf_idx.argsort(-1)), rtol=1e-5, atol=1e-6
    )
    # the same bias in bfloat16 would route most tokens elsewhere
    assert (collapsed != top_bias).any(-1).sum() >= 16
    # the rest of the model runs in bf16 and stays close to transformers' bf16 model
    ids = torch.randint(0, info["n_base"], (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _rel(m(ids), hf(ids).logits.float()) < 0.1


def test_config_reads_transformers_fields(tmp_path):
    """Every field of transformers' KimiLinearConfig has a stated treatment, and parsing gives the
    geometry transformers builds."""
    from prfaas.model.hf_config import TRANSFORMERS_FIELDS

    assert set(transformers.KimiLinearConfig.__annotations__) <= set(TRANSFORMERS_FIELDS)
    info = write_release_dir(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    ours = ModelConfig.from_hf_dict(d)
    ref = transformers.KimiLinearConfig(**d)
    assert [ref.layer_types[i] == "full_attention" for i in range(6)] == [
        k == "mla" for k in ours.layer_kinds
    ]
    assert [t == "sparse" for t in ref.mlp_layer_types] == [ours.is_moe_layer(i) for i in range(6)]
    assert (ref.num_local_experts, ref.num_experts_per_tok, ref.n_shared_experts) == (
        ours.num_experts,
        ours.num_experts_per_token,
        ours.num_shared_experts,
    )
    assert (ref.linear_num_heads, ref.linear_head_dim, ref.linear_conv_kernel_dim) == (
        ours.kda_num_heads,
        ours.kda_head_dim,
        ours.short_conv_kernel_size,
    )
    assert ref.norm_topk_prob == ours.moe_renormalize and info["config"]["vocab_size"] == 574


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_expert_group": 4, "topk_group": 2}, "group-limited"),
        ({"q_lora_rank": 64}, "q_lora_rank"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
        ({"mlp_layer_types": ["sparse", "dense"] * 3}, "mlp_layer_types"),
        ({"layer_types": ["full_attention"] * 5}, "layer_types"),
    ],
)
def test_unsupported_config_values_are_refused(change, match):
    from kimi_files import release_config

    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(release_config(574, **change))


def test_config_defaults_and_aliases_follow_transformers():
    from kimi_files import release_config

    d = release_config(574)
    lin = d.pop("linear_attn_config")
    d["linear_attn_config"] = {"full_attn_layers": lin["full_attn_layers"]}  # no kda_layers
    d.pop("num_experts")
    d["num_local_experts"] = 8
    d["n_group"], d["topk_group"] = 2, 2  # all groups kept: plain top-k
    ours = ModelConfig.from_hf_dict(d)
    ref = transformers.KimiLinearConfig(**d)
    # without both lists transformers puts full attention on every 4th layer from layer 4
    assert [t == "full_attention" for t in ref.layer_types] == [
        k == "mla" for k in ours.layer_kinds
    ]
    assert ours.num_experts == 8 and ours.kda_head_dim == ref.linear_head_dim == 128
    assert ours.eos_token_id == ref.eos_token_id == d["eos_token_id"]
    d["eos_token_id"] = None  # explicit null: no eos (transformers keeps None)
    assert (
        ModelConfig.from_hf_dict(d).eos_token_id
        is None
        is transformers.KimiLinearConfig(**d).eos_token_id
    )
    del d["eos_token_id"]  # absent: transformers' default
    assert (
        ModelConfig.from_hf_dict(d).eos_token_id == transformers.KimiLinearConfig(**d).eos_token_id
    )


def _run(eng, prompt, params):
    rid = eng.add_request(prompt, params)
    for _ in range(200):
        for o in eng.step():
            if o.request_id == rid and o.finished:
                return o
    raise AssertionError("the request did not finish")


def test_stop_tokens_generation_config_request_and_ignore_eos(release, tmp_path):
    """Stops: generation_config.json's list, a request's stop_token_ids, and ignore_eos."""
    import shutil

    from prfaas.tokenizer import load_tokenizer

    d, info, hf, ours = release
    prompt = torch.randint(0, info["n_base"], (15,), generator=torch.Generator().manual_seed(7))
    prompt = prompt.tolist()
    cfg = EngineConfig(model=str(d), device="cpu", dtype="float32", max_model_len=64)
    free = _run(LLMEngine(cfg, model=ours), prompt, SamplingParams(temperature=0, max_tokens=12))
    seq = free.token_ids
    assert len(seq) == 12 and free.finish_reason == "length"
    a = next(i for i in range(2, 12) if seq[i] not in seq[:i])  # first fresh token after 2
    b = next(i for i in range(a + 1, 12) if seq[i] not in seq[:i])
    # a directory whose generation_config.json lists seq[a] among its stop tokens
    d2 = tmp_path / "stops"
    shutil.copytree(d, d2)
    gen = json.loads((d2 / "generation_config.json").read_text())
    gen["eos_token_id"] = [info["specials"]["<|im_end|>"], seq[a]]
    (d2 / "generation_config.json").write_text(json.dumps(gen))
    eng = LLMEngine(EngineConfig(**{**cfg.__dict__, "model": str(d2)}), model=ours)
    assert eng.tokenizer.stop_token_ids == tuple(
        sorted({*gen["eos_token_id"], info["specials"]["[EOS]"]})
    )
    out = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=12))
    assert out.token_ids == seq[: a + 1] and out.finish_reason == "stop"
    out = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out.token_ids == seq and out.finish_reason == "length"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[seq[b]])
    out = _run(eng, prompt, params)
    assert out.token_ids == seq[: b + 1] and out.finish_reason == "stop"
    assert load_tokenizer(str(d2)).stop_token_ids == eng.tokenizer.stop_token_ids
