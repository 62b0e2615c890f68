"""The second cache tier on a real Mooncake Store: evicted prefixes come back from the pool with
identical tokens and without recomputation; wrong objects are refused; a dead master means
recomputation, never wrong output."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
import torch

from prfaas.cache import store_tier
from prfaas.cache.hashing import hash_chain
from prfaas.cache.pool_mooncake import MooncakeKVStore, MooncakeMaster, PoolAddress
from prfaas.cache.store_tier import (
    BadObject,
    BlockObject,
    StoreBlockLayout,
    StoreTier,
    decode,
    encode,
)
from prfaas.engine import EngineConfig, LLMEngine, SamplingParams

SP = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def make_engine(model, tier: StoreTier | None = None) -> LLMEngine:
    cfg = EngineConfig(
        model="tiny",
        num_blocks=24,
        num_checkpoints=4,
        max_num_seqs=4,
        checkpoint_interval=64,
        block_size=16,
    )
    eng = LLMEngine(cfg, model=model)
    if tier is not None:
        eng.cache.attach_tier(tier)
    return eng


def run(eng: LLMEngine, prompt: list[int]):
    eng.add_request(prompt, SP)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out = o
    return out


def prompts(seed: int, n: int = 4, length: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(384) for _ in range(length)] for _ in range(n)]


def evict(eng: LLMEngine, prompt: list[int], others: list[list[int]]) -> None:
    for p in others:
        run(eng, p)
    h = hash_chain(prompt, 16)
    assert all(eng.cache.blocks.lookup(x) is None for x in h), "prefix still in the node cache"


@pytest.fixture(scope="module")
def master():
    with MooncakeMaster() as m:
        yield m


@pytest.fixture(scope="module")
def pool(master):
    s = MooncakeKVStore(master.address, segment_mb=32, buffer_mb=8)
    yield s
    s.close(wait=False)


# ----- object format (no store) ---------------------------------------------------------------
def test_codec_round_trip_and_refusals(tiny_model):
    eng = make_engine(tiny_model)
    lay = StoreBlockLayout.of(eng.cache)
    g = torch.Generator().manual_seed(0)
    mla = torch.randn(lay.mla_shape, generator=g)
    kda = torch.randn(lay.kda_shape, generator=g)
    conv = torch.randn(lay.conv_shape, generator=g)
    data = encode(lay, BlockObject(123, mla, kda, conv))
    back = decode(lay, data, 123)
    assert (
        torch.equal(back.mla, mla) and torch.equal(back.kda, kda) and torch.equal(back.conv, conv)
    )
    only_state = decode(lay, encode(lay, BlockObject(-5, None, kda, conv)), -5)
    assert only_state.mla is None and torch.equal(only_state.kda, kda)
    with pytest.raises(BadObject, match="hash"):
        decode(lay, data, 124)
    other = StoreBlockLayout(**{**lay.__dict__, "fingerprint": "0" * 16})
    with pytest.raises(BadObject, match="fingerprint"):
        decode(lay, encode(other, BlockObject(123, mla, None, None)), 123)
    bf = StoreBlockLayout(**{**lay.__dict__, "dtype": "bfloat16"})
    with pytest.raises(BadObject, match="dtype"):
        decode(lay, encode(bf, BlockObject(123, mla.bfloat16(), None, None)), 123)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    with pytest.raises(BadObject, match="corrupt"):
        decode(lay, bytes(corrupt), 123)
    for junk in (b"", b"\x00\x00", b"\xff\xff\x00\x00xx", b"\x02\x00\x00\x00{}"):
        with pytest.raises(BadObject):
            decode(lay, junk, 123)
    with pytest.raises(ValueError, match="both"):
        encode(lay, BlockObject(1, None, kda, None))
    with pytest.raises(ValueError, match="does not match"):
        encode(lay, BlockObject(1, mla[:1], None, None))
    assert lay.key(-1, "kv").endswith("ffffffffffffffff/kv")


def test_bad_settings():
    with pytest.raises(ValueError, match="retry_after_s"):
        StoreTier({}, retry_after_s=-1)
    with pytest.raises(ValueError, match="host:port"):
        PoolAddress("localhost", "http://x/metadata")
    with pytest.raises(ValueError, match="http"):
        PoolAddress("127.0.0.1:1", "ftp://x")
    with pytest.raises(ValueError, match="segment_mb"):
        MooncakeKVStore(PoolAddress("127.0.0.1:1", "http://127.0.0.1:2/metadata"), segment_mb=0)


def test_tier_off_is_todays_behaviour(tiny_model):
    a, *others = prompts(1)
    eng = make_engine(tiny_model)
    assert eng.cache.tier is None and eng.cache.blocks.on_evict is None
    run(eng, a)
    evict(eng, a, others)
    before = eng.num_prefill_tokens_computed
    out = run(eng, a)
    assert eng.num_prefill_tokens_computed - before == 200 and out.num_cached_tokens == 0


# ----- the pool on Mooncake Store --------------------------------------------------------------
def test_evicted_prefix_is_served_from_the_pool(tiny_model, pool):
    a, *others = prompts(2)
    want = run(make_engine(tiny_model), a).token_ids
    tier = StoreTier(pool)
    eng = make_engine(tiny_model, tier)
    assert run(eng, a).token_ids == want
    assert eng.num_prefill_tokens_computed == 200
    evict(eng, a, others)
    assert tier.stats.blocks_put >= 12 and tier.stats.failures == 0
    before = eng.num_prefill_tokens_computed
    out = run(eng, a)
    # 192 tokens (3 checkpoint intervals) from the pool, the 8-token tail computed
    assert eng.num_prefill_tokens_computed - before == 8
    assert out.num_cached_tokens == 192
    assert out.token_ids == want
    assert tier.stats.blocks_fetched >= 12 and tier.stats.states_fetched == 1
    assert tier.stats.refused == 0
    eng.cache.check()
    # another node of the same cluster (its own cache, empty) reuses the same pool objects
    eng2 = make_engine(tiny_model, StoreTier(pool))
    out2 = run(eng2, a)
    assert out2.token_ids == want and eng2.num_prefill_tokens_computed == 8


def test_wrong_object_in_the_pool_is_refused(tiny_model, pool):
    (a,) = prompts(3, n=1)
    want = run(make_engine(tiny_model), a).token_ids
    tier = StoreTier(pool)
    eng = make_engine(tiny_model, tier)
    lay = StoreBlockLayout.of(eng.cache)
    hs = hash_chain(a, 16)
    # another model's block under this model's key (a stale or forged object)
    alien = StoreBlockLayout(**{**lay.__dict__, "fingerprint": "f" * 16})
    pool.put(
        lay.key(hs[0], "kv"),
        encode(alien, BlockObject(hs[0], torch.ones(lay.mla_shape), None, None)),
    )
    out = run(eng, a)
    assert out.token_ids == want
    assert eng.num_prefill_tokens_computed == 200 and out.num_cached_tokens == 0
    assert tier.stats.refused == 1 and tier.stats.blocks_fetched == 0


def test_master_death_degrades_to_recomputation(tiny_model, caplog, monkeypatch):
    a, *others = prompts(4)
    want = run(make_engine(tiny_model), a).token_ids
    # the tier's back-off runs on a clock the test holds still: "backed off" must not depend on
    # how long a loaded machine takes for the rest of the test (one reconnect stall is ~4 s)
    clock = [1000.0]
    monkeypatch.setattr(store_tier, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    m = MooncakeMaster().start()
    try:
        store = MooncakeKVStore(m.address, segment_mb=16, buffer_mb=4)
        tier = StoreTier(store, retry_after_s=60.0)
        eng = make_engine(tiny_model, tier)
        run(eng, a)
        evict(eng, a, others)
        assert tier.stats.blocks_put >= 12
        m.stop()  # the cluster's master dies with the objects' index
        before = eng.num_prefill_tokens_computed
        with caplog.at_level(logging.WARNING, logger="prfaas.cache.store_tier"):
            out = run(eng, a)
            computed = eng.num_prefill_tokens_computed - before
            for p in others:  # evictions while the master is down must not fail either
                assert run(eng, p) is not None
        assert out.token_ids == want
        assert computed == 200 and out.num_cached_tokens == 0
        assert tier.stats.failures >= 1 and tier.stats.blocks_fetched == 0
        assert any("recomputing instead" in r.message for r in caplog.records)
        assert tier.stats.failures == 1  # backed off: no further ~4 s reconnect stalls
        assert not tier.available
        clock[0] += 60.0  # the back-off is over: the tier tries the store again
        assert tier.available
        eng.cache.check()
        store.close(wait=False)
    finally:
        m.stop()
