"""Random traffic on one mixed engine with a small cache: prompts sharing prefixes (the prefix
cache reuses them only at state checkpoints), arrivals between steps, aborts, chunked prefills,
preemptions and evictions, synchronous and pipelined decode.  Every request that is not aborted
ends with exactly the greedy tokens of the cache-free forward, and nothing stays held."""

from __future__ import annotations

import random

import pytest
from test_engine import reference_greedy

from prfaas import EngineConfig, LLMEngine, SamplingParams


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_gives_the_reference_tokens_and_frees_everything(tiny_model, seed):
    rng = random.Random(100 + seed)
    eng = LLMEngine(
        EngineConfig(
            model="tiny",
            max_num_seqs=(2, 4)[seed % 2],
            max_num_batched_tokens=(24, 64)[seed // 2 % 2],
            num_blocks=(14, 20, 28)[seed % 3],
            checkpoint_interval=16,
            num_checkpoints=6,
            async_decode=seed % 2 == 1,
        ),
        model=tiny_model,
    )
    bases = [[rng.randrange(256) for _ in range(64)] for _ in range(3)]
    reqs: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    done: dict[str, object] = {}

    def step() -> None:
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o

    for _ in range(24):
        p = rng.choice(bases)[: rng.randrange(0, 65)] + [
            rng.randrange(256) for _ in range(rng.randrange(1, 20))
        ]
        n = rng.randrange(1, 12)
        rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        reqs[rid] = (p, n)
        if rng.random() < 0.15:
            victim = rng.choice(list(reqs))
            eng.abort(victim)
            aborted.add(victim)
        for _ in range(rng.randrange(0, 4)):
            if eng.has_unfinished():
                step()
    steps = 0
    while eng.has_unfinished():
        step()
        steps += 1
        assert steps < 2000, f"no progress: {eng.stats()}"
    hits = 0
    for rid, (p, n) in reqs.items():
        o = done[rid]
        if rid in aborted and o.finish_reason == "abort":
            continue
        assert (o.finish_reason, o.token_ids) == ("length", reference_greedy(tiny_model, p, n)), rid
        hits += o.num_cached_tokens
    eng.cache.check()
    assert eng.cache.blocks.num_in_use() == 0 and eng.cache.checkpoints.num_in_use() == 0
    st = eng.stats()
    assert (st.waiting, st.running, st.free_slots) == (0, 0, eng.config.max_num_seqs)
    assert hits > 0  # prefixes were reused
