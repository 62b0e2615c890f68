"""Pipelined greedy decode (``EngineConfig.async_decode``): the next decode step is launched with
its input tokens taken on the device before the previous step's tokens are read back. Everything
it produces must equal the synchronous engine's, token for token."""

from __future__ import annotations

import random

from prfaas import EngineConfig, LLMEngine, SamplingParams


def make(model, async_decode: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", async_decode=async_decode, **kw), model=model)


def drive(eng: LLMEngine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], abort=None):
    """Run until done, adding requests at the given step numbers; returns {rid: (tokens, reason)}.
    ``abort``: (step, index of the request to abort)."""
    done, ids, step = {}, [], 0
    while eng.has_unfinished() or step <= max(arrivals):
        for prompt, sp in arrivals.get(step, []):
            ids.append(eng.add_request(prompt, sp))
        if abort is not None and step == abort[0]:
            eng.abort(ids[abort[1]])
        for o in eng.step():
            if o.finished:
                done[o.request_id] = (o.token_ids, o.finish_reason)
        step += 1
        assert step < 5000
    return [done[i] for i in ids]


def workload(seed: int, n: int, stop: list[int] | None = None):
    rng = random.Random(seed)
    out = {}
    for _ in range(n):
        sp = SamplingParams(
            temperature=0,
            max_tokens=rng.randrange(1, 24),
            ignore_eos=True,
            stop_token_ids=list(stop or []),
        )
        out.setdefault(rng.choice([0, 0, 3, 9, 20]), []).append(
            ([rng.randrange(256) for _ in range(rng.randrange(2, 90))], sp)
        )
    return out


def test_same_tokens_as_synchronous_engine(tiny_model):
    work = workload(1, 10)
    want = drive(make(tiny_model, False), work)
    eng = make(tiny_model, True)
    assert drive(eng, work) == want
    assert eng.num_pipelined_steps > 10  # the decode stretches did run pipelined


def test_stop_tokens_end_requests_mid_pipeline(tiny_model):
    """Stop on tokens the model does produce: the row already launched for the stopped request's
    next position is dropped."""
    base = drive(make(tiny_model, False), workload(2, 8))
    produced = [t for toks, _ in base for t in toks[1:4]]
    stop = sorted(set(produced))[:3]
    work = workload(2, 8, stop=stop)
    want = drive(make(tiny_model, False), work)
    assert any(reason == "stop" for _, reason in want)
    eng = make(tiny_model, True)
    assert drive(eng, work) == want
    assert eng.num_pipelined_steps > 0
    assert eng.cache.blocks.num_in_use() == 0 and eng.cache.num_free_slots == eng.cache.cfg.max_seqs


def test_abort_while_a_step_is_pending(tiny_model):
    work = {0: [([7, 8, 9] * 10, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))]}
    work[0].append(([1, 2, 3] * 7, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    want = drive(make(tiny_model, False), work, abort=(6, 0))
    eng = make(tiny_model, True)
    got = drive(eng, work, abort=(6, 0))
    assert got[1] == want[1] and got[0][1] == "abort"
    assert eng.cache.blocks.num_in_use() == 0


def test_preemption_and_sampling_fall_back_to_synchronous_steps(tiny_model):
    """A cache too small for every request, and a sampled request among greedy ones: the same
    tokens as the synchronous engine (pipelining waits for a step where it applies)."""
    work = workload(3, 8)
    kw = {"num_blocks": 14, "max_num_seqs": 6, "enable_prefix_cache": False}
    want = drive(make(tiny_model, False, **kw), work)
    eng = make(tiny_model, True, **kw)
    assert drive(eng, work) == want
    assert eng.num_preemptions > 0
    sampled = {0: [([5] * 30, SamplingParams(temperature=0.8, seed=3, max_tokens=12))]}
    sampled[0] += [([6] * 20, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
    want = drive(make(tiny_model, False), sampled)
    eng = make(tiny_model, True)
    assert drive(eng, sampled) == want
    assert eng.num_pipelined_steps == 0
