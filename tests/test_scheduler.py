"""The scheduler alone, driven with fake model outputs (no model runs): token budgets, chunked
prefill on checkpoint boundaries, preemption on a full cache, aborts, stops, the prefill hand-off,
requests waiting for their KV, and the pipelined decode step."""

from __future__ import annotations

import pytest

from prfaas.cache.hybrid import CacheConfig, CacheFull, HybridCache
from prfaas.engine.request import KVArrival, Request, Status
from prfaas.engine.sampling import SamplingParams
from prfaas.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from prfaas.model.config import resolve_config

EOS = 257


def make(
    budget: int = 512,
    max_seqs: int = 8,
    num_blocks: int = 64,
    prefix: bool = False,
    max_model_len: int = 4096,
) -> Scheduler:
    cache = HybridCache(
        resolve_config("tiny"),
        CacheConfig(
            block_size=16,
            num_blocks=num_blocks,
            max_seqs=max_seqs,
            checkpoint_interval=64,
            num_checkpoints=8,
            enable_prefix_cache=prefix,
        ),
    )
    cfg = SchedulerConfig(max_seqs, budget, max_model_len, frozenset({EOS}))
    return Scheduler(cfg, cache)


def req(rid: str, n: int, max_tokens: int = 4, base: int = 0, **kw) -> Request:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=False, **kw)
    return Request(rid, [(base + i) % 250 for i in range(n)], sp, 0)


def step(s: Scheduler, tok: int = 1) -> tuple[SchedulerOutput, list[Request]]:
    """One step with a fake model: every sampling row yields ``tok``."""
    out = s.schedule()
    for imp in out.imports:
        if imp.error is None:
            s.import_written(imp.request)
    reports = s.update_from_output(out, [tok if r.samples else None for r in out.rows])
    return out, reports


def rows(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(r.request.request_id, r.start, r.num_tokens) for r in out.rows]


def no_leak(s: Scheduler) -> None:
    s.cache.check()
    assert s.cache.blocks.num_in_use() == 0
    assert s.cache.num_free_slots == s.cache.cfg.max_seqs
    assert not s.requests and not s.has_unfinished()


def test_token_budget_and_chunks():
    s = make(budget=64)
    a, b = req("a", 100, max_tokens=2), req("b", 40, max_tokens=2)
    s.add(a)
    s.add(b)
    out, rep = step(s)
    assert rows(out) == [("a", 0, 64)] and rep == []  # the budget ends the admissions
    out, rep = step(s)
    assert rows(out) == [("a", 64, 36), ("b", 0, 28)]  # a's last chunk samples: token 1
    assert out.rows[0].samples and not out.rows[1].samples and rep == [a]
    assert a.output == [1] and a.num_computed == 100
    out, rep = step(s)
    # decodes first, then the prefill under way
    assert rows(out) == [("a", 100, 1), ("b", 28, 12)]
    assert [r.is_prefill for r in out.rows] == [False, True]
    assert rep == [a, b] and a.finish_reason == "length" and b.output == [1]
    out, rep = step(s)
    assert rows(out) == [("b", 40, 1)] and b.status == Status.FINISHED
    assert s.num_prefill_tokens_computed == 140 and s.num_decode_tokens == 2
    no_leak(s)


def test_chunks_end_on_checkpoint_boundaries():
    s = make(budget=100, prefix=True)
    a = req("a", 150, max_tokens=1)
    s.add(a)
    starts = []
    while s.has_unfinished():
        out, _ = step(s)
        starts += rows(out)
    assert starts == [("a", 0, 64), ("a", 64, 64), ("a", 128, 22)]
    # the prompt's blocks and checkpoints at 64 and 128 stay cached: a second request reuses 128
    b = req("b", 150, max_tokens=1)
    s.add(b)
    out, _ = step(s)
    assert rows(out) == [("b", 128, 22)] and b.num_cached_tokens == 128
    no_leak(s)


def test_max_num_seqs_limits_admissions():
    s = make(max_seqs=2)
    rs = [req(f"r{i}", 10, max_tokens=3) for i in range(3)]
    for r in rs:
        s.add(r)
    out, _ = step(s)
    assert [x[0] for x in rows(out)] == ["r0", "r1"] and rs[2].status == Status.WAITING
    while s.has_unfinished():
        step(s)
    assert all(r.finish_reason == "length" and len(r.output) == 3 for r in rs)
    no_leak(s)


def test_preemption_on_a_full_cache_recomputes_later():
    # 4 blocks of 16: two 30-token prompts hold 2 blocks each (prompt + 1); a's decode of its
    # 33rd token needs a third block: b (the newest) is preempted
    s = make(num_blocks=4)
    a, b = req("a", 30, max_tokens=6), req("b", 30, max_tokens=6, base=100)
    s.add(a)
    s.add(b)
    step(s)  # both prefill, sample their first token (31 tokens each)
    out, _ = step(s)  # decodes: 32 tokens each, still 2 blocks
    assert rows(out) == [("a", 30, 1), ("b", 30, 1)] and not out.preempted
    out, _ = step(s)
    assert out.preempted == ["b"] and rows(out) == [("a", 31, 1)]
    assert b.status == Status.WAITING and b.cache is None and b.num_computed == 0
    assert b.output == [1, 1] and s.num_preemptions == 1
    while a.status == Status.RUNNING:
        out, _ = step(s)
        assert [x[0] for x in rows(out)] == ["a"]
    # b is readmitted and recomputes its prompt and its output so far, then decodes on
    out, _ = step(s)
    assert rows(out) == [("b", 0, 32)] and out.rows[0].samples and b.output == [1, 1, 1]
    while s.has_unfinished():
        step(s)
    assert b.finish_reason == "length" and len(b.output) == 6 and b.num_preemptions == 1
    no_leak(s)


def test_alone_without_room_ends_by_length():
    s = make(num_blocks=2)
    a = req("a", 30, max_tokens=10)
    s.add(a)
    step(s)  # 31 tokens in 2 blocks
    step(s)  # 32
    out, rep = step(s)  # the next decode needs a third block; nobody to preempt
    assert rep == [a] and a.finish_reason == "length" and not out.rows
    assert out.finished == ["a"]
    no_leak(s)


def test_stops():
    s = make(max_model_len=40)
    a = req("a", 10, max_tokens=5, stop_token_ids=[7])
    b = req("b", 10, max_tokens=5)
    c = req("c", 36, max_tokens=50)  # max_model_len: 4 output tokens
    d = req("d", 10, max_tokens=5)
    for r in (a, b, c, d):
        s.add(r)
    out = s.schedule()
    by_id = {"a": 7, "b": EOS, "c": 3, "d": 3}
    s.update_from_output(out, [by_id[r.request.request_id] for r in out.rows])
    assert (a.finish_reason, b.finish_reason) == ("stop", "stop")
    assert a.output == [7] and b.output == [EOS] and c.status == d.status == Status.RUNNING
    while s.has_unfinished():
        step(s, tok=3)
    assert c.finish_reason == "length" and c.num_tokens == 40
    assert d.finish_reason == "length" and len(d.output) == 5
    no_leak(s)


def test_aborts_anywhere_free_everything_and_are_reported():
    s = make(budget=16, max_seqs=2)
    a, b, c = req("a", 40), req("b", 40), req("c", 40)
    for r in (a, b, c):
        s.add(r)
    step(s)  # a mid-prefill (16 of 40), b and c waiting
    s.finish(a, "abort", report=True)
    s.finish(c, "abort", report=True)
    out, rep = step(s)
    assert rep == [a, c] and a.finish_reason == "abort" and rows(out) == [("b", 0, 16)]
    assert out.finished == ["a", "c"]
    s.finish(b, "abort", report=True)
    assert s.take_reports() == [b]
    no_leak(s)


def test_prefill_role_hands_off():
    s = make(budget=32)
    a = req("a", 50)
    a.handoff_at = 49
    one = req("one", 1)
    one.handoff_at = 0  # nothing to compute: handed off at admission
    s.add(a)
    s.add(one)
    out, rep = step(s)
    assert rows(out) == [("a", 0, 32)] and not out.rows[0].hands_off
    out, rep = step(s)
    assert rows(out) == [("a", 32, 17)] and out.rows[0].hands_off and not out.rows[0].samples
    assert rep == [one, a] and one.status == a.status == Status.PREFILLED
    assert a.output == [] and set(s.prefilled) == {"a", "one"} and not s.has_unfinished()
    assert s.cache.blocks.num_in_use() > 0  # held for export
    for r in (a, one):
        s.finish(r, "prefilled")
    no_leak(s)


def arrival(n_prompt: int, token_start: int = 0, log: list | None = None) -> KVArrival:
    return KVArrival(token_start, n_prompt - 1, data=None, on_done=(log or []).append)


def test_waiting_for_kv_then_decodes():
    s = make()
    a = req("a", 40, max_tokens=3)
    s.expect_kv(a)
    assert not s.has_unfinished() and a.cache is None  # holds nothing while waiting
    out, _ = step(s)
    assert not out.rows and a.status == Status.WAITING_FOR_KV
    with pytest.raises(KeyError):
        s.kv_arrived("nobody", arrival(40))
    s.kv_arrived("a", arrival(40))
    out = s.schedule()
    # admitted and written before the step; its first row computes the last prompt token
    assert [i.request for i in out.imports] == [a] and rows(out) == [("a", 39, 1)]
    s.import_written(a)
    s.update_from_output(out, [5])
    assert a.output == [5] and s.num_prefill_tokens_computed == 1
    while s.has_unfinished():
        step(s)
    assert a.finish_reason == "length" and len(a.output) == 3
    no_leak(s)


def test_waiting_for_kv_timeout_abort_and_missing_prefix():
    s = make()
    late, gone, bad = req("late", 20), req("gone", 20), req("bad", 40)
    s.expect_kv(late, timeout_s=0.0)
    s.expect_kv(gone)
    s.expect_kv(bad)
    log: list = []
    s.kv_arrived("gone", arrival(20, log=log))
    s.finish(gone, "abort", report=True)  # arrived, not written: its buffers come back
    s.kv_arrived("bad", arrival(40, token_start=16, log=log))  # this node holds no prefix
    out, rep = step(s)
    assert late.finish_reason == "error" and "did not arrive" in late.error
    assert set(rep) == {late, gone}
    dropped = {i.request.request_id: i.error for i in out.imports}
    assert dropped["gone"] == "request ended (abort)" and "prefix cache" in dropped["bad"]
    # the prefix is gone: bad waits on for a KV from token 0
    assert bad.status == Status.WAITING_FOR_KV and not s.has_unfinished()
    s.kv_arrived("bad", arrival(40))
    out, _ = step(s)
    assert [i.request for i in out.imports] == [bad] and rows(out) == [("bad", 39, 1)]
    s.finish(bad, "abort")
    no_leak(s)


def test_arrived_kv_waits_for_room_and_goes_first():
    s = make(max_seqs=1)
    a, b, c = req("a", 20, max_tokens=3), req("b", 20, max_tokens=2), req("c", 20)
    s.add(a)
    step(s)
    s.expect_kv(b)
    s.kv_arrived("b", arrival(20))
    s.add(c)
    out, _ = step(s)  # no slot: b waits with its KV
    assert not out.imports and b.status == Status.WAITING_FOR_KV and s.has_unfinished()
    with pytest.raises(CacheFull):
        s.admit_import(req("d", 20), 0, 19)
    out, _ = step(s)
    assert not out.imports and a.finish_reason == "length"
    out, _ = step(s)  # a ended at the last step: b is admitted before c
    assert [i.request for i in out.imports] == [b] and rows(out) == [("b", 19, 1)]
    while s.has_unfinished():
        step(s)
    assert b.finish_reason == c.finish_reason == "length"
    no_leak(s)


def test_pipelined_decode_rows():
    s = make()
    a, b = req("a", 10, max_tokens=3), req("b", 10, max_tokens=9)
    s.add(a)
    s.add(b)
    out, _ = step(s)
    assert not s.can_pipeline(out)  # prefills
    out = s.schedule()
    assert s.can_pipeline(out) and rows(out) == [("a", 10, 1), ("b", 10, 1)]
    ahead = s.schedule_ahead(out)  # launched before out's tokens are known
    assert ahead is not None and ahead.ahead and rows(ahead) == [("a", 11, 1), ("b", 11, 1)]
    s.update_from_output(out, [1, 1])
    nxt = s.schedule_ahead(ahead)  # a ends with ahead's token (3 tokens): only b goes on
    assert nxt is not None and rows(nxt) == [("b", 12, 1)]
    s.update_from_output(ahead, [2, 2])
    assert a.finish_reason == "length" and a.output == [1, 1, 2]
    s.finish(b, "abort", report=True)  # aborted while nxt runs: its row is dropped
    assert s.update_from_output(nxt, [3]) == [b] and b.output == [1, 1, 2]
    s.add(req("c", 5))
    assert s.schedule_ahead(nxt) is None  # nothing left to run ahead
    while s.has_unfinished():
        step(s)
    no_leak(s)
