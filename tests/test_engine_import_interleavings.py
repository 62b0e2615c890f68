"""Random interleavings of a decode node's import paths on one engine with room for about two
requests: KV waits (``expect_kv``), layers landing early (``import_layer``), transfers that fail
half-way (``drop_layers``) and are sent again, whole deliveries (``import_kv``), aborts and steps,
in random orders.  Whatever the order, every request that is not aborted finishes within a bounded
number of steps (no import waits on another forever) with the tokens one mixed engine gives, every
import's ``on_done`` is called exactly once, and nothing stays held at the end."""

from __future__ import annotations

import random

import pytest
from test_engine_kv_wait import exports, finish_all, make

from prfaas import SamplingParams

N_REQ = 5
SP = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def case(tiny_model):
    rng = random.Random(5)
    ps = [[rng.randrange(256) for _ in range(rng.randrange(40, 75))] for _ in range(N_REQ)]
    mixed = make(tiny_model)
    for i, p in enumerate(ps):
        mixed.add_request(p, SP, f"r{i}")
    want = {k: v.token_ids for k, v in finish_all(mixed).items()}
    return ps, want, exports(tiny_model, ps, SP)


@pytest.mark.parametrize("seed", range(12))
def test_any_interleaving_of_imports_finishes_and_frees_everything(tiny_model, case, seed):
    ps, want, exps = case
    rng = random.Random(seed)
    # 10-16 blocks of 16 tokens: room for two or three of these requests at once (5 blocks each)
    dec = make(
        tiny_model,
        role="decode",
        num_blocks=(10, 12, 16)[seed // 3 % 3],
        max_num_seqs=3,
        async_decode=seed % 2 == 1,
    )
    for i, p in enumerate(ps):
        assert dec.expect_kv(f"r{i}", p, SP) == 0
    aborted = {f"r{rng.randrange(N_REQ)}"} if seed % 3 == 0 else set()
    # each request's events in order: some layers, maybe a failure and all layers again, delivery
    plans = []
    for i, e in enumerate(exps):
        ev = [("layer", i, part) for part in e.parts[: rng.randrange(len(e.parts) + 1)]]
        if rng.random() < 0.4:
            ev.append(("fail", i, None))
            ev += [("layer", i, part) for part in e.parts]
        ev.append(("deliver", i, None))
        plans.append(ev)
    calls: dict[str, list] = {f"r{i}": [] for i in range(N_REQ)}
    done: dict[str, object] = {}
    while any(plans):
        i = rng.choice([k for k, p in enumerate(plans) if p])
        kind, _, part = plans[i].pop(0)
        rid, e = f"r{i}", exps[i]
        if kind == "layer":
            dec.import_layer(e.header, part)
        elif kind == "fail":
            dec.drop_layers(rid)
        else:
            try:
                dec.import_kv(e, calls[rid].append)
            except KeyError:  # aborted before its KV came: nobody waits for it
                assert rid in aborted
        if rid in aborted and rng.random() < 0.5:
            dec.abort(rid)
        if rng.random() < 0.3 and dec.has_unfinished():
            for o in dec.step():
                if o.finished:
                    done[o.request_id] = o
    for rid in aborted:
        dec.abort(rid)
    done.update(finish_all(dec, max_steps=500))
    for i in range(N_REQ):
        rid = f"r{i}"
        if rid in aborted and done[rid].finish_reason == "abort":
            assert len(calls[rid]) <= 1  # its buffers were handed back if it had arrived
            continue  # (an abort after the request's end changes nothing: checked below)
        assert done[rid].token_ids == want[rid], (rid, done[rid].finish_reason, done[rid].error)
        assert calls[rid] == [None]  # written once
    st = dec.stats()
    assert (st.waiting_for_kv, st.running, st.free_slots) == (0, 0, 3)
    assert dec.cache.blocks.num_in_use() == 0
