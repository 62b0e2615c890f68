"""The engine's scheduler: which requests run in the next step, with which tokens; and what the
step's results do to them. It never touches the model: ``schedule()`` returns a plain
``SchedulerOutput`` (rows to run, KV imports to write first, what was preempted or finished), the
engine runs it, and ``update_from_output(out, tokens)`` takes the sampled tokens back.

Policy (continuous batching under a per-step token budget ``max_num_batched_tokens``):

1. KV imports that have arrived are admitted first (a state slot and blocks for the whole prompt +
   1), oldest first, except that one whose blocks its early layers reserved never waits behind
   one without room; they decode from this step on. An import that starts beyond the cached
   prefix ``expect_kv`` held for it is dropped (the request waits on for a KV that starts lower).
2. Decodes of running requests, oldest first, one token each. When the cache has no block for one,
   the blocks that requests still waiting for their KV reserved for early layers are given back
   first, then the newest running request is preempted (its cache freed, recomputed later from its
   tokens; never an import admitted in this step), possibly the one asking; a request alone in the
   cache without room ends with ``length``.
3. Prefills under way, in chunks that end on state-checkpoint boundaries (prefix caching).
4. Waiting requests, in order, while slots, blocks (whole prompt + 1 reserved at admission) and
   budget last; none right after a preemption (the freed blocks go to running requests).

Requests finished outside a step (aborts, ``length`` at scheduling, hand-offs at admission,
KV waits that timed out) are reported by the next ``update_from_output`` / ``take_reports``.
Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from prfaas.cache.hybrid import HybridCache
from prfaas.engine.kv_imports import KVImports
from prfaas.engine.request import Request, Status
from prfaas.engine.schedule_types import (
    ScheduledImport,
    ScheduledRow,
    SchedulerConfig,
    SchedulerOutput,
)

__all__ = ["ScheduledImport", "ScheduledRow", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


class Scheduler(KVImports):
    """Owns the request queues and every request's hold on ``cache`` (slots, blocks)."""

    def __init__(self, config: SchedulerConfig, cache: HybridCache) -> None:
        self.config, self.cache = config, cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}  # insertion order = arrival order
        self.arrived: deque[Request] = deque()  # waiting for KV, KV here, waiting for room
        self.prefilled: dict[str, Request] = {}  # prefill role: done, cache held for export
        self.requests: dict[str, Request] = {}  # every request not finished
        self._reports: list[Request] = []  # finished outside a step, not yet reported
        self._dropped: list[ScheduledImport] = []  # arrived KV of requests that ended
        # counters
        self.num_prefill_tokens_computed = 0
        self.num_decode_tokens = 0
        self.num_preemptions = 0

    # ----- requests in ------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a new request (its id must be unused)."""
        self._register(req)
        req.status = Status.WAITING
        self.waiting.append(req)

    def _register(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} already in use")
        self.requests[req.request_id] = req

    # ----- cache of one request ---------------------------------------------------------------
    def _chunk(self, req: Request, budget: int) -> int:
        n = min(req.num_pending, budget)
        cfg = self.cache.cfg
        ci = cfg.checkpoint_interval
        if cfg.enable_prefix_cache and ci > 0 and req.cache is not None:
            nxt = (req.num_computed // ci + 1) * ci
            if req.num_computed + n > nxt and nxt <= req.cache.prompt_len:
                n = nxt - req.num_computed  # end the chunk on a checkpoint boundary
        return n

    def _admit(self, req: Request) -> bool:
        if not self.cache.num_free_slots:
            return False
        seq = self.cache.open(req.tokens)
        if not self.cache.can_reserve(seq, req.num_tokens + 1):
            self.cache.close(seq)
            return False
        self.cache.reserve(seq, req.num_tokens + 1)
        req.cache = seq
        req.num_computed = seq.num_cached_tokens
        if not req.output:
            req.num_cached_tokens = seq.num_cached_tokens
        req.status = Status.RUNNING
        self.running.append(req)
        if req.num_pending <= 0:  # prefill role, prefix all cached (or a 1-token prompt)
            self._handoff(req)
            self._reports.append(req)
        return True

    def _preempt(self, req: Request) -> None:
        """Free a running request's cache and queue it to be recomputed from its tokens."""
        self.running.remove(req)
        if req.cache is not None:
            self.cache.close(req.cache)
            req.cache = None
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _handoff(self, req: Request) -> None:
        """Prefill role: the request's prefill is done; hold its cache for export."""
        self.running.remove(req)
        req.status = Status.PREFILLED
        req.finish_reason = "prefilled"
        req.metrics.finished = time.monotonic()
        self.prefilled[req.request_id] = req

    @staticmethod
    def _row(req: Request, n: int, now: float) -> ScheduledRow:
        if req.metrics.first_scheduled is None:
            req.metrics.first_scheduled = now
        end = req.num_computed + n
        hands_off = req.handoff_at is not None and end >= req.handoff_at
        return ScheduledRow(
            req,
            req.num_computed,
            n,
            is_prefill=req.in_prefill,
            hands_off=hands_off,
            samples=not hands_off and end >= req.num_tokens,
        )

    # ----- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = time.monotonic()
        self._expire_kv_waits(now)
        out = SchedulerOutput(imports=self._dropped)
        self._dropped = []
        rows = out.rows
        budget = self.config.max_num_batched_tokens
        self._admit_arrived(out)  # 1. arrived KV imports
        # 2. decodes, oldest first
        gone: set[int] = set()  # preempted in this loop (a set: `in self.running` is O(n))

        def preempt(r: Request) -> None:
            self._preempt(r)
            gone.add(id(r))
            out.preempted.append(r.request_id)

        # imports admitted just now: their KV is written before this step runs, so they are not
        # preempted in it (they would lose the blocks it is written into)
        fresh = {id(i.request) for i in out.imports if i.error is None}
        for req in list(self.running):
            if id(req) in gone or req.in_prefill:
                continue
            if budget <= 0:
                break
            while not self.cache.can_reserve(req.cache, req.num_tokens + 1):
                if self._drop_reservation():  # speculative holds go before running requests
                    continue
                victim = next((r for r in reversed(self.running) if id(r) not in fresh), req)
                if victim is req:
                    break
                for k, row in enumerate(rows):
                    if row.request is victim:
                        del rows[k]
                        budget += row.num_tokens
                        break
                preempt(victim)
            if not self.cache.can_reserve(req.cache, req.num_tokens + 1):
                if len(self.running) == 1:  # alone and still no room: the cache is its length limit
                    self.finish(req, "length", report=True)
                else:
                    preempt(req)
                continue
            self.cache.reserve(req.cache, req.num_tokens + 1)
            rows.append(self._row(req, 1, now))
            budget -= 1
        # 3. prefills under way (their prompt blocks were reserved at admission)
        for req in self.running:
            if budget <= 0:
                break
            if req.in_prefill:
                n = self._chunk(req, budget)
                rows.append(self._row(req, n, now))
                budget -= n
        # 4. waiting requests
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.popleft()
            if req.status != Status.RUNNING:
                continue  # handed off at admission
            n = self._chunk(req, budget)
            rows.append(self._row(req, n, now))
            budget -= n
        out.finished = [r.request_id for r in self._reports if r.status == Status.FINISHED]
        return out

    def can_pipeline(self, out: SchedulerOutput) -> bool:
        """``out`` decodes every running request, one greedy token each, with nothing waiting to
        be admitted: the next step may be launched before its tokens are read back
        (``schedule_ahead``)."""
        return (
            bool(out.rows)
            and not self.waiting
            and not self.arrived
            and len(out.rows) == len(self.running)
            and all(
                r.num_tokens == 1 and not r.is_prefill and r.request.params.plain_greedy
                for r in out.rows
            )
        )

    def _new_blocks(self, r: Request, ahead: int) -> int:
        """Cache blocks ``r`` still needs to cover ``num_tokens + ahead`` positions."""
        assert r.cache is not None
        return max(0, self.cache.blocks_for(r.num_tokens + ahead) - len(r.cache.blocks))

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The decode step after ``prev`` (whose tokens are not read back yet): its rows that do not
        end by length, one position further; None when it does not apply (a row's request ended,
        something waits to be admitted, no blocks)."""
        live = [r.request for r in prev.rows if r.request.status == Status.RUNNING]
        go = [
            r
            for r in live
            if len(r.output) + 1 < r.params.max_tokens
            and r.num_tokens + 1 < self.config.max_model_len
        ]
        if (
            not go
            or self.waiting
            or self.arrived
            or len(live) != len(self.running)
            # the blocks of all rows together (one row's can_reserve says nothing about the
            # others: a full cache raised CacheFull and aborted the whole batch)
            or sum(self._new_blocks(r, 2) for r in go) > self.cache.blocks.num_free
        ):
            return None
        for r in go:
            self.cache.reserve(r.cache, r.num_tokens + 2)
        rows = [ScheduledRow(r, r.num_computed + 1, 1, False, False, True) for r in go]
        return SchedulerOutput(rows=rows, ahead=True)

    def update_from_output(
        self, out: SchedulerOutput, tokens: Sequence[int | None]
    ) -> list[Request]:
        """Apply a step's results: ``tokens[i]`` is row ``i``'s sampled token (None for rows
        that do not sample). Returns the requests to report, in order: those finished outside a
        step since the last call, then every row's request that got a token, was handed off or
        finished. Rows of requests that ended meanwhile (aborted, or stopped by the previous
        pipelined step) are dropped. Raises what a row's update raised; the reports due are
        kept for ``take_reports`` then (a request finished in the update is still reported)."""
        reports: list[Request] = []
        try:
            for row, tok in zip(out.rows, tokens, strict=True):
                req = row.request
                if req.status != Status.RUNNING:
                    continue
                if row.is_prefill:
                    self.num_prefill_tokens_computed += row.num_tokens
                else:
                    self.num_decode_tokens += 1
                req.num_computed += row.num_tokens
                self.cache.on_computed(req.cache, req.num_computed)
                if row.hands_off:
                    self._handoff(req)
                    reports.append(req)
                    continue
                if not row.samples:
                    continue  # mid-prefill chunk
                assert tok is not None, "a sampling row needs its token"
                self._append_token(req, tok)
                reports.append(req)
        except BaseException:
            self._reports.extend(reports)
            raise
        return self.take_reports() + reports

    def take_reports(self) -> list[Request]:
        """Requests finished outside a step, not yet reported."""
        reports, self._reports = self._reports, []
        return reports

    def _append_token(self, req: Request, tok: int) -> None:
        req.output.append(tok)
        if req.metrics.first_token is None:
            req.metrics.first_token = time.monotonic()
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.config.stop_ids):
            self.finish(req, "stop")
        elif len(req.output) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            self.finish(req, "length")

    # ----- requests out -----------------------------------------------------------------------
    def finish(
        self, req: Request, reason: str, report: bool = False, error: str | None = None
    ) -> None:
        """End ``req`` wherever it is and free its cache; ``report``: return it from the next
        ``update_from_output`` / ``take_reports``."""
        if req.status == Status.RUNNING and req in self.running:
            self.running.remove(req)
        elif req.status == Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        elif req.status == Status.WAITING_FOR_KV:
            self.waiting_for_kv.pop(req.request_id, None)
            self._release_held(req)
            if req.kv_arrival is not None:  # arrived, never written: hand its buffers back
                if req in self.arrived:
                    self.arrived.remove(req)
                self._dropped.append(
                    ScheduledImport(req, req.kv_arrival, error or f"request ended ({reason})")
                )
                req.kv_arrival = None
        self.prefilled.pop(req.request_id, None)
        if req.cache is not None:
            self.cache.close(req.cache)
            req.cache = None
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.metrics.finished = time.monotonic()
        self.requests.pop(req.request_id, None)
        if report:
            self._reports.append(req)

    def has_unfinished(self) -> bool:
        """Work for ``schedule()``: requests queued, running or with arrived KV, or reports (or
        dropped imports) not yet taken. Requests still waiting for their KV do not count."""
        return bool(self.waiting or self.running or self.arrived or self._reports or self._dropped)
