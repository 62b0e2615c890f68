"""Tensor (and expert) parallelism on the CPU with gloo: a TP=2 instance of the tiny preset (MoE
layers included) gives the same greedy tokens as TP=1; its ranks hold slices of the same random
model; exports gathered from TP=2 import into TP=1 and exports of TP=1 into TP=2, and decoding
continues with identical tokens; prefix-cache checkpoints (state ops mirrored to the ranks) and
layer-wise streaming hold under TP. Worker ranks are spawned processes on the loopback; every
collective is bounded by PRFAAS_TP_TIMEOUT_S."""

from __future__ import annotations

import os
import random

import pytest
import torch

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.model.config import PRESETS
from prfaas.model.model import HybridForCausalLM
from prfaas.model.tp.group import TPGroup
from prfaas.model.tp.shard import check_tp, shard_tensor

CFG = PRESETS["tiny"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# small cache, checkpoints every block: the prefix cache's state operations run on short prompts
ENGINE_KW = dict(
    model="tiny",
    device="cpu",
    max_num_seqs=4,
    max_model_len=256,
    block_size=16,
    checkpoint_interval=16,
    num_blocks=96,
    max_num_batched_tokens=64,
)


@pytest.fixture(scope="module", autouse=True)
def _bounded_collectives():
    old = os.environ.get("PRFAAS_TP_TIMEOUT_S")
    os.environ["PRFAAS_TP_TIMEOUT_S"] = "300"
    yield
    if old is None:
        os.environ.pop("PRFAAS_TP_TIMEOUT_S", None)
    else:
        os.environ["PRFAAS_TP_TIMEOUT_S"] = old


def engine(tp: int = 1, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(**{**ENGINE_KW, **kw}, tensor_parallel_size=tp))


@pytest.fixture(scope="module")
def mixed2():
    e = engine(2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def prefill2():
    e = engine(2, role="prefill")
    yield e
    e.close()


def run_all(eng: LLMEngine, prompts: list[list[int]], sp: SamplingParams = GREEDY) -> list:
    ids = [eng.add_request(p, sp) for p in prompts]
    done, steps = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        assert steps < 2000
    return [done[i] for i in ids]


def prompts(seed: int, n: int, lo: int = 20, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


# ----- the plan, no processes ----------------------------------------------------------------
def test_check_tp_refuses_what_does_not_divide():
    assert check_tp(CFG, 1) is None and check_tp(CFG, 2) is None
    why = check_tp(CFG, 4)
    assert "kda_num_heads 2" in why and "tensor_parallel_size 4" in why
    assert check_tp(PRESETS["kimi-linear-48b"], 8) is None
    assert "num_experts 256" in check_tp(PRESETS["kimi-linear-48b"], 3)


def test_rank_weights_are_slices_of_the_same_model():
    """A rank's random weights are its slices of the TP=1 model's (same seed): every parameter
    of the whole model is held, split or whole, by the ranks."""
    whole = dict(HybridForCausalLM(CFG).init_weights(3).named_parameters())
    held = {name: 0 for name in whole}
    for rank in range(2):
        m = HybridForCausalLM(CFG, TPGroup(rank, 2)).init_weights(3)
        mine = dict(m.named_parameters())
        for name, full in whole.items():
            got = shard_tensor(CFG, name, full, rank, 2)
            if got is None:
                continue
            lname, part = got
            assert torch.equal(mine[lname], part), name
            held[name] += 1
        e = m.model.layers[1].block_sparse_moe
        assert len(e.experts) == CFG.num_experts // 2 and e.first == rank * 4
    assert all(held.values())
    assert held["model.layers.1.block_sparse_moe.experts.0.w1.weight"] == 1  # one rank's expert
    assert held["model.layers.0.self_attn.q_proj.weight"] == 2  # split


def test_expert_parallel_partials_sum_to_the_whole_moe():
    """Each rank's routed pairs (the others' sorted past its last group, no work) plus its share
    of the shared expert sum to the whole MoE, for 2 and 4 ranks."""
    from prfaas.model import moe_ops
    from prfaas.model.tp.layers import ep_experts_forward

    g = torch.Generator().manual_seed(0)
    T, H, inter, E, k = 37, 16, 8, 8, 2
    x = torch.randn(T, H, generator=g, dtype=torch.float32)
    w13 = torch.randn(E, 2 * inter, H, generator=g, dtype=torch.float32)
    w2 = torch.randn(E, H, inter, generator=g, dtype=torch.float32)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    shared = torch.randn(T, H, generator=g, dtype=torch.float32)
    whole = moe_ops.experts_forward(x, w, idx, w13, w2, shared)
    for n in (2, 4):
        m = E // n
        parts = [
            ep_experts_forward(
                x, w, idx, r * m, w13[r * m : (r + 1) * m], w2[r * m : (r + 1) * m], shared / n
            )
            for r in range(n)
        ]
        torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-4)  # fp32 sums


# ----- TP=2 engines ----------------------------------------------------------------------------
def test_tp2_greedy_equals_tp1(mixed2):
    """Batched prompts (mixed prefill and decode steps, MoE layers), then prompts sharing those
    prefixes (state slots restored from checkpoints saved on every rank)."""
    first = prompts(1, 3)
    second = [p[:40] + q for p, q in zip(first, prompts(2, 3, 5, 20), strict=True)]
    ref = engine(1)
    want = [o.token_ids for o in run_all(ref, first)] + [o.token_ids for o in run_all(ref, second)]
    got = [o.token_ids for o in run_all(mixed2, first)]
    hits = mixed2.cache.hits
    got += [o.token_ids for o in run_all(mixed2, second)]
    assert mixed2.cache.hits > hits  # the second round reused cached prefixes
    assert got == want


def test_export_tp2_imports_into_tp1(prefill2):
    p, other = prompts(5, 1, 60, 61)[0], prompts(15, 1, 150, 151)[0]
    (want,) = run_all(engine(1), [p])
    streamed = []
    prefill2.layer_listener = lambda req, part: streamed.append((req.request_id, part))
    try:  # ``other`` still prefills (chunks of 64) in the step where ``p`` hands off
        out, out_other = run_all(prefill2, [p, other])
    finally:
        prefill2.layer_listener = None
    exp = prefill2.export_request(out.request_id)
    prefill2.release(out.request_id)
    prefill2.release(out_other.request_id)
    streamed = [part for rid, part in streamed if rid == out.request_id]
    assert exp.header.meta["tensor_parallel_size"] == 2
    # whole heads, the same bytes as streamed layer by layer during the last chunk
    state = exp.parts[0].tensors["state"]
    assert state.shape == (CFG.kda_num_heads, CFG.kda_head_dim, CFG.kda_head_dim)
    assert [s.layer for s in streamed] == list(range(CFG.num_hidden_layers))
    for s_part, e_part in zip(streamed, exp.parts, strict=True):
        for k, t in e_part.tensors.items():
            assert torch.equal(s_part.tensors[k], t), (e_part.layer, k)
    dec = engine(1, role="decode")
    dec.import_request(exp, GREEDY)
    outs = []
    while dec.has_unfinished():
        outs += [o for o in dec.step() if o.finished]
    assert outs[-1].token_ids == want.token_ids


def test_export_tp1_imports_into_tp2(mixed2):
    p = prompts(6, 1, 50, 51)[0]
    (want,) = run_all(engine(1), [p])
    pre = engine(1, role="prefill")
    (out,) = run_all(pre, [p])
    exp = pre.export_request(out.request_id)
    mixed2.import_request(exp, GREEDY)
    outs = []
    while mixed2.has_unfinished():
        outs += [o for o in mixed2.step() if o.finished]
    assert outs[-1].token_ids == want.token_ids


def test_layers_land_one_by_one_into_tp2(mixed2):
    """The decode node's path: each layer written as it lands (``import_layer``: KDA heads and MLA
    rows broadcast to the ranks), the final ``import_kv`` writes nothing more."""
    p = prompts(8, 1, 45, 46)[0]
    (want,) = run_all(engine(1), [p])
    pre = engine(1, role="prefill")
    (out,) = run_all(pre, [p])
    exp = pre.export_request(out.request_id)
    rid = exp.header.request_id
    mixed2.expect_kv(rid, p, GREEDY)
    assert all(mixed2.import_layer(exp.header, part) for part in reversed(exp.parts))
    errors: list = []
    mixed2.import_kv(exp, errors.append)
    outs = []
    while mixed2.has_unfinished():
        outs += [o for o in mixed2.step() if o.finished and o.request_id == rid]
    assert errors == [None] and outs[-1].token_ids == want.token_ids


def test_a_dead_rank_is_reported_not_waited_for():
    e = engine(2)
    try:
        p = e.tp.procs[0]
        p.kill()
        p.join(60)
        e.add_request([1, 2, 3, 4], GREEDY)
        with pytest.raises(RuntimeError, match="rank 1 died"):
            e.step()
    finally:
        e.close()
    assert not p.is_alive()


def test_tp2_engine_refuses_a_model_object():
    with pytest.raises(ValueError, match="builds its ranks' models"):
        LLMEngine(EngineConfig(model="tiny", tensor_parallel_size=2), model=object())


def test_tp4_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="tensor_parallel_size 4 does not divide"):
        engine(4)
