"""The scheduler's side for requests whose KV another node computes (decode and mixed roles):
held by ``expect_kv`` (their cached prefix pinned), their early layers' slot and blocks reserved
(``reserve_import``), their arrived KV admitted oldest first once there is room (``admit_import``;
one whose blocks are already reserved never waits behind one without room), reservations given
back before a running request is preempted (``_drop_reservation``), waits that time out ended.

``KVImports`` is a part of ``Scheduler`` (a base class of it): it works on the scheduler's queues
and cache, declared below."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prfaas.cache.hybrid import CacheFull, HybridCache
from prfaas.engine.request import KVArrival, Request, Status
from prfaas.engine.schedule_types import ScheduledImport, SchedulerConfig, SchedulerOutput


class KVImports:
    """Requests waiting for their KV, and the admission of the KV that arrived."""

    config: SchedulerConfig
    cache: HybridCache
    running: list[Request]
    requests: dict[str, Request]
    waiting_for_kv: dict[str, Request]  # insertion order = arrival order
    arrived: deque[Request]  # waiting for KV, KV here, waiting for room

    if TYPE_CHECKING:  # the Scheduler's

        def _register(self, req: Request) -> None: ...

        def finish(
            self, req: Request, reason: str, report: bool = False, error: str | None = None
        ) -> None: ...

    def expect_kv(self, req: Request, timeout_s: float | None = None) -> int:
        """Hold a request whose prompt's KV comes from another node (``kv_arrived``). Returns the
        prompt tokens this node holds in its prefix cache (block aligned, at most ``len(prompt) -
        1``): the KV to send starts there. Their blocks are held (no eviction takes them) until
        the KV is admitted or the request ends, so a KV sent from there fits when it comes; the
        request holds no other cache until then. After ``timeout_s`` without its KV it ends with
        ``error``."""
        self._register(req)
        req.status = Status.WAITING_FOR_KV
        req.kv_deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.waiting_for_kv[req.request_id] = req
        m = self.cache.hold_prefix(req.prompt, max_tokens=len(req.prompt) - 1)
        req.kv_held = m.blocks
        return m.num_tokens

    def _release_held(self, req: Request) -> None:
        """Drop the hold ``expect_kv`` took on the request's cached prefix."""
        held, req.kv_held = req.kv_held, []
        self.cache.release_blocks(held)

    def kv_arrived(self, request_id: str, arrival: KVArrival) -> Request:
        """The KV of a request waiting for it has arrived: it is admitted (``imports`` of a
        ``SchedulerOutput``) once a slot and blocks are free. KeyError if nobody waits for it."""
        req = self.waiting_for_kv.get(request_id)
        if req is None or req.kv_arrival is not None:
            raise KeyError(f"no request {request_id!r} is waiting for its KV")
        req.kv_arrival = arrival
        self.arrived.append(req)
        return req

    def admit_import(self, req: Request, token_start: int, token_end: int) -> None:
        """Give ``req`` a state slot and blocks for its prompt + 1, reusing exactly the cached
        prefix [0, token_start), and make it run (it decodes from token ``token_end``, the last
        prompt token). The caller writes the KV of [token_start, token_end) before the next step
        runs, then calls ``import_written``. Raises CacheFull (no slot or blocks) or ValueError
        (the prefix is not in the prefix cache, the id is taken); nothing changes then."""
        rid = req.request_id
        if self.requests.get(rid, req) is not req:
            raise ValueError(f"request id {rid!r} already in use")
        if len(self.running) >= self.config.max_num_seqs:
            raise CacheFull("no free request slot for an imported request")
        if req.cache is None or req.kv_staged != (token_start, token_end):
            self.unreserve_import(req)
            self.reserve_import(req, token_start, token_end)
        self.requests[rid] = req
        self.waiting_for_kv.pop(rid, None)
        self._release_held(req)  # its cache (reserved above) references the prefix itself
        req.num_computed = token_end  # the last prompt token is this node's first input
        req.num_cached_tokens = token_start
        req.kv_arrival = None
        req.kv_deadline = None
        req.kv_staged = None
        req.status = Status.RUNNING
        self.running.append(req)

    def reserve_import(self, req: Request, token_start: int, token_end: int) -> None:
        """Give ``req`` (waiting for its KV, or being admitted) a state slot and blocks for its
        prompt + 1, reusing exactly the cached prefix [0, token_start), without making it run:
        its layers are written as they land (layer-wise import). Raises CacheFull or ValueError
        as ``admit_import``; nothing changes then."""
        if not self.cache.num_free_slots:
            raise CacheFull("no free request slot for an imported request")
        prompt = req.prompt
        seq = self.cache.open(prompt, need_state=False, max_reuse=token_start)
        if seq.num_cached_tokens != token_start:
            self.cache.close(seq)
            raise ValueError(
                f"import starts at token {token_start} but only {seq.num_cached_tokens} prompt "
                "tokens are in this node's prefix cache"
            )
        if not self.cache.can_reserve(seq, len(prompt) + 1):
            self.cache.close(seq)
            raise CacheFull("no cache blocks free for an imported request")
        self.cache.reserve(seq, len(prompt) + 1)
        req.cache = seq
        req.kv_staged = (token_start, token_end)
        req.kv_layers = set()

    def unreserve_import(self, req: Request) -> None:
        """Give back what ``reserve_import`` gave a request still waiting for its KV (its
        transfer failed: a new one may start from another token)."""
        if req.cache is not None and req.status == Status.WAITING_FOR_KV:
            self.cache.close(req.cache)
            req.cache = None
        req.kv_staged = None
        req.kv_layers = set()

    def _drop_reservation(self) -> bool:
        """Give back the newest reservation that a request still waiting for (the admission of)
        its KV took for its early layers (``reserve_import``): a running request needing a block
        comes first.  Its layers are written again with the rest when its KV is admitted.  False
        when no such reservation is held."""
        for r in reversed(self.waiting_for_kv.values()):
            if r.cache is not None and r.kv_staged is not None:
                self.unreserve_import(r)
                return True
        return False

    def import_written(self, req: Request) -> None:
        """The imported KV is in ``req``'s cache: publish its prompt blocks (and a state
        checkpoint on a boundary) in the prefix cache."""
        assert req.cache is not None
        self.cache.on_computed(req.cache, req.num_computed)

    def _admit_arrived(self, out: SchedulerOutput) -> None:
        """Admit arrived KV imports, oldest first, while slots and blocks last.  Once one finds
        no room, only those whose blocks are already reserved (their layers landed early) follow:
        they need no more room, and the one waiting may be waiting for exactly their blocks."""
        blocked = False
        for req in list(self.arrived):
            if len(self.running) >= self.config.max_num_seqs:
                return
            arrival = req.kv_arrival
            assert arrival is not None
            if blocked and (req.cache is None or req.kv_staged != arrival.span):
                continue
            try:
                self.admit_import(req, arrival.token_start, arrival.token_end)
            except CacheFull:
                blocked = True
                continue
            except ValueError as e:  # its cached prefix is gone: it waits for a whole KV
                req.kv_arrival = None
                out.imports.append(ScheduledImport(req, arrival, str(e)))
            else:
                out.imports.append(ScheduledImport(req, arrival))  # written before the rows run
            self.arrived.remove(req)

    def _expire_kv_waits(self, now: float) -> None:
        late = [
            r
            for r in self.waiting_for_kv.values()
            if r.kv_deadline is not None and r.kv_arrival is None and now >= r.kv_deadline
        ]
        for r in late:
            self.finish(r, "error", report=True, error="its KV cache did not arrive in time")
