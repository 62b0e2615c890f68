"""A decode engine holding requests that wait for their KV (``expect_kv``): the KV arrives
(``import_kv``), is written once there is room, and the tokens equal one mixed engine's; waits
end on abort or timeout with the arrived buffers handed back; ``stats()`` counts them."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.engine.kv_io import ImportMismatch


def make(model, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", **kw), model=model)


def finish_all(eng: LLMEngine, max_steps: int = 2000) -> dict[str, object]:
    done, steps = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        assert steps < max_steps, f"no progress: {eng.stats()}"
    return done


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(20, 70))] for _ in range(n)]


def exports(model, ps: list[list[int]], sp: SamplingParams) -> list:
    pre = make(model, role="prefill")
    rids = [pre.add_request(p, sp, f"r{i}") for i, p in enumerate(ps)]
    finish_all(pre)
    out = [pre.export_request(r) for r in rids]
    for r in rids:
        pre.release(r)
    return out


@pytest.mark.parametrize("async_decode", [False, True])
def test_expected_requests_decode_like_mixed(tiny_model, async_decode):
    ps = prompts(4)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    mixed = make(tiny_model)
    ids = [mixed.add_request(p, sp, f"r{i}") for i, p in enumerate(ps)]
    want = {k: v.token_ids for k, v in finish_all(mixed).items()}
    exps = exports(tiny_model, ps, sp)
    # two slots for four requests: the other two wait with their KV until a slot frees
    dec = make(tiny_model, role="decode", max_num_seqs=2, async_decode=async_decode)
    for i, p in enumerate(ps):
        assert dec.expect_kv(f"r{i}", p, sp) == 0  # no prefix held
    st = dec.stats()
    assert (st.waiting_for_kv, st.running, dec.cache.blocks.num_in_use()) == (4, 0, 0)
    assert not dec.has_unfinished()  # nothing to step until a KV arrives
    log: list = []
    for e in exps:
        dec.import_kv(e, lambda err, rid=e.header.request_id: log.append((rid, err)))
    assert dec.stats().kv_arrived == 4 and log == []
    dec.step()
    assert log == [("r0", None), ("r1", None)] and dec.stats().running == 2
    got = {k: v.token_ids for k, v in finish_all(dec).items()}
    assert got == want and [r for r, _ in log] == ids and all(e is None for _, e in log)
    st = dec.stats()
    assert (st.waiting_for_kv, st.running, st.free_slots) == (0, 0, 2)
    assert dec.cache.blocks.num_in_use() == 0


def test_kv_wait_ends_on_abort_timeout_and_bad_kv(tiny_model):
    ps = prompts(3, seed=1)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    (e0, e1, e2) = exports(tiny_model, ps, sp)
    dec = make(tiny_model, role="decode")
    dec.expect_kv("r0", ps[0], sp)
    dec.expect_kv("r1", ps[1], sp, timeout_s=0.0)
    dec.expect_kv("r2", ps[2], sp)
    with pytest.raises(KeyError):  # nobody waits for "x"
        dec.import_kv(replace(e1, header=replace(e1.header, request_id="x")))
    with pytest.raises(ImportMismatch):
        dec.import_kv(replace(e2, parts=e2.parts[:-1]))  # r2 keeps waiting
    log: list = []
    dec.import_kv(e0, log.append)
    dec.abort("r0")  # arrived, not yet written: its buffers are handed back
    outs = {o.request_id: o for o in dec.step()}
    assert outs["r0"].finish_reason == "abort" and log == ["request ended (abort)"]
    assert outs["r1"].finish_reason == "error" and "did not arrive" in outs["r1"].error
    assert dec.stats().waiting_for_kv == 1
    dec.import_kv(e2)
    assert finish_all(dec)["r2"].finish_reason == "length"
    assert dec.cache.blocks.num_in_use() == 0 and dec.stats().waiting_for_kv == 0
    with pytest.raises(ValueError, match="prefill-role"):
        make(tiny_model, role="prefill").expect_kv("x", ps[0])


def test_abort_all_frees_every_request(tiny_model):
    ps = prompts(3, seed=2)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    (e0,) = exports(tiny_model, ps[:1], sp)
    eng = make(tiny_model, max_num_seqs=2)
    log: list = []
    eng.expect_kv("r0", ps[0], sp)
    eng.import_kv(e0, log.append)
    eng.add_request(ps[1], sp, "a")
    eng.add_request(ps[2], sp, "b")
    eng.expect_kv("w", ps[2], sp)
    for _ in range(4):
        eng.step()
    assert eng.stats().running == 2 and log == [None]
    assert eng.abort_all() == 4
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ["a", "b", "r0", "w"]
    assert all(o.finish_reason == "abort" for o in outs)
    st = eng.stats()
    assert (st.running, st.waiting, st.waiting_for_kv, st.free_slots) == (0, 0, 0, 2)
    assert not eng.has_unfinished() and eng.cache.blocks.num_in_use() == 0


def test_layers_written_as_they_land_decode_like_mixed(tiny_model):
    """``import_layer`` writes each layer into the request's blocks as it lands (the first one
    reserves the slot and blocks); the final ``import_kv`` writes only the others. Layers that
    cannot be written now (no slot, a bad part) fall back to the final import; a failed transfer's
    layers are dropped with their reservation."""
    import torch

    ps = prompts(4, seed=3)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    mixed = make(tiny_model)
    for i, p in enumerate(ps):
        mixed.add_request(p, sp, f"r{i}")
    want = {k: v.token_ids for k, v in finish_all(mixed).items()}
    exps = exports(tiny_model, ps, sp)
    dec = make(tiny_model, role="decode", max_num_seqs=2)
    for i, p in enumerate(ps):
        dec.expect_kv(f"r{i}", p, sp)
    e0, e1, e2, e3 = exps
    # r0: every layer, in any order (connections deliver out of order); then its buffer is
    # reused (zeroed here): the layers already in the cache are not copied again
    assert all(dec.import_layer(e0.header, p) for p in reversed(e0.parts))
    assert dec.cache.blocks.num_in_use() > 0 and dec.stats().running == 0
    zeroed = replace(
        e0,
        parts=[
            replace(p, tensors={k: torch.zeros_like(t) for k, t in p.tensors.items()})
            for p in e0.parts
        ],
    )
    # r1: half its layers, then its transfer fails: the reservation goes back
    in_use = dec.cache.blocks.num_in_use()
    assert all(dec.import_layer(e1.header, p) for p in e1.parts[:3])
    assert dec.cache.blocks.num_in_use() > in_use
    dec.drop_layers("r1")
    assert dec.cache.blocks.num_in_use() == in_use
    # r2: a non-finite part is refused (written with the rest, where the whole import checks it)
    bad = replace(
        e2.parts[1],
        tensors={k: torch.full_like(t, float("nan")) for k, t in e2.parts[1].tensors.items()},
    )
    assert dec.import_layer(e2.header, e2.parts[0])
    assert not dec.import_layer(e2.header, bad)
    # r3: both slots are reserved (r0, r2): its layers wait for the final import
    assert not dec.import_layer(e3.header, e3.parts[0])
    assert not dec.import_layer(replace(e3.header, request_id="nobody"), e3.parts[0])
    log: list = []
    for e in (zeroed, e1, e2, e3):
        dec.import_kv(e, lambda err, rid=e.header.request_id: log.append((rid, err)))
    got = {k: v.token_ids for k, v in finish_all(dec).items()}
    assert got == want and sorted(log) == [(f"r{i}", None) for i in range(4)]
    assert dec.cache.blocks.num_in_use() == 0 and dec.stats().free_slots == 2


def test_row_runs_and_both_write_paths(tiny_model, monkeypatch):
    """A layer's MLA rows are written run by run of consecutive blocks (one copy each, straight
    into the cache), or by one index_copy_ when the blocks are scattered: same tokens."""
    from prfaas.engine import kv_io

    assert kv_io.row_runs([5, 6, 7, 2, 3], 4, 0, 20) == [(20, 0, 12), (8, 12, 8)]
    assert kv_io.row_runs([5, 6, 7, 2, 3], 4, 3, 13) == [(23, 0, 9), (8, 9, 1)]
    assert kv_io.row_runs([5], 4, 2, 2) == []
    ps = prompts(2, seed=4)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    mixed = make(tiny_model)
    for i, p in enumerate(ps):
        mixed.add_request(p, sp, f"r{i}")
    want = {k: v.token_ids for k, v in finish_all(mixed).items()}
    for max_runs in (0, kv_io.MAX_RUNS):
        monkeypatch.setattr(kv_io, "MAX_RUNS", max_runs)
        dec = make(tiny_model, role="decode")
        for i, p in enumerate(ps):
            dec.expect_kv(f"r{i}", p, sp)
        for e in exports(tiny_model, ps, sp):
            assert all(dec.import_layer(e.header, part) for part in e.parts)
            dec.import_kv(e)
        assert {k: v.token_ids for k, v in finish_all(dec).items()} == want


def test_held_prefix_survives_a_full_cache_until_the_kv_comes(tiny_model):
    """The prefix ``expect_kv`` answered is held while the request waits: a request that takes
    every other block meanwhile evicts none of it, the KV sent from there imports, and the tokens
    equal one mixed engine's; abort and timeout let go of the hold."""
    rng = random.Random(7)
    p0 = [rng.randrange(256) for _ in range(128)]
    p1 = p0[:96] + [rng.randrange(256) for _ in range(40)]  # 6 blocks of 16 shared with p0
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    mixed = make(tiny_model)
    mixed.add_request(p1, sp, "b")
    want = finish_all(mixed)["b"].token_ids
    dec = make(tiny_model, role="decode", num_blocks=20)
    (e0,) = exports(tiny_model, [p0], sp)
    assert dec.expect_kv("r0", p0, sp) == 0
    dec.import_kv(e0)
    finish_all(dec)  # p0's 8 prompt blocks stay cached (evictable)
    assert dec.expect_kv("b", p1, sp) == 96
    assert dec.cache.blocks.num_in_use() == 6  # held
    # a request that takes every block left (free or evictable) while b's KV is on its way
    free = dec.cache.blocks.num_free
    filler = [rng.randrange(256) for _ in range(free * 16 - 1)]
    (ef,) = exports(tiny_model, [filler], replace(sp, max_tokens=1))
    dec.expect_kv("r0", filler, sp)  # exports() names it r0
    dec.import_kv(ef)
    dec.step()
    assert dec.stats().running == 1 and dec.cache.blocks.num_free == 0
    finish_all(dec)
    # b's KV from token 96 (what the decode node answered) fits: the prefix is still here
    pre = make(tiny_model, role="prefill")
    pre.add_request(p1, sp, "b")
    finish_all(pre)
    log: list = []
    dec.import_kv(pre.export_request("b", token_start=96), log.append)
    done = finish_all(dec)
    assert log == [None]  # written (without the hold: dropped, the prefix was evicted)
    assert done["b"].token_ids == want and done["b"].num_cached_tokens == 96
    assert dec.cache.blocks.num_in_use() == 0
    # abort and timeout drop the hold
    assert dec.expect_kv("c", p1, sp) == 128 and dec.cache.blocks.num_in_use() == 8
    dec.abort("c")
    dec.expect_kv("d", p1, sp, timeout_s=0.0)
    outs = {o.request_id: o.finish_reason for o in dec.step()}
    assert outs == {"c": "abort", "d": "error"} and dec.cache.blocks.num_in_use() == 0
    dec.cache.check()


def test_an_import_whose_layers_reserved_its_blocks_never_waits_behind_one_without_room(
    tiny_model,
):
    """Room for one request: r1's layers landed first and reserved its blocks, then r0's whole
    KV arrived before r1's.  r0 has no room (r1 holds it) and must not block r1, whose blocks
    are there: r1 decodes, frees them, then r0 does; tokens equal one mixed engine's.  (Found in
    the killed-node chaos test: four imports on one decode node waited on each other until their
    clients gave up.)"""
    rng = random.Random(11)
    ps = [[rng.randrange(256) for _ in range(60)] for _ in range(2)]  # 4 blocks each, with +1
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    mixed = make(tiny_model)
    for i, p in enumerate(ps):
        mixed.add_request(p, sp, f"r{i}")
    want = {k: v.token_ids for k, v in finish_all(mixed).items()}
    e0, e1 = exports(tiny_model, ps, sp)
    dec = make(tiny_model, role="decode", num_blocks=6)
    for i, p in enumerate(ps):
        dec.expect_kv(f"r{i}", p, sp)
    assert all(dec.import_layer(e1.header, part) for part in e1.parts)  # r1's blocks reserved
    assert not dec.import_layer(e0.header, e0.parts[0])  # no room left for r0's
    log: list = []
    dec.import_kv(e0, lambda err: log.append(("r0", err)))  # r0's KV arrives first
    dec.import_kv(e1, lambda err: log.append(("r1", err)))
    dec.step()
    assert log == [("r1", None)]  # r1 admitted past r0, which waits for room
    got = {k: v.token_ids for k, v in finish_all(dec).items()}
    assert log == [("r1", None), ("r0", None)] and got == want
    assert dec.cache.blocks.num_in_use() == 0
