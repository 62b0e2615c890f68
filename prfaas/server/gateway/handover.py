"""One request's hand-over between its nodes, as the gateway drives it: the decode node's event
stream (``DecodeStream``), the prefill on the chosen prefill node with retries on another one
(``prefill_and_handover``), and the admitted request the API reads tokens from (``Generation``).

Per request: the decode stream opens first (the decode node answers ``ready`` with the prefix it
holds, ``token_start``), then the prefill node prefills and ships the KV from ``token_start``, then
the decode node reports ``kv`` (imported) and streams ``token`` events.  A prefill that fails is
retried where the policy decides next among the nodes this request has not tried (which falls back
to PD-P): a node that did not answer is marked down; one that answered with an error (that
request's failure: its transfer, its input) stays up for the others, unless it failed several
prefills in a row (``LiveState.prefill_failed``); a prefill that failed because the decode node had
already ended the request (an ``error`` event: its engine failed, no KV in time) is not retried and
blames no prefill node: the decode node's error is the answer.  A prefill node that answered that
its transfer to the decode node failed (503 ``transfer_failed``) blames the decode node instead
when its stream died or it missed ``DECODE_PROBES`` state polls in a row (502, the decode node is
down); one missed poll is not enough, and no other prefill failure probes the decode node.  A
``kv_error`` with a decode-side prefix resends everything from token 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from prfaas.scheduling.types import RequestInfo, RouteDecision
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint, PrefillFailed
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.protocol import (
    DecodeEvent,
    DecodeRequest,
    DecodeTarget,
    ErrorEvent,
    KVErrorEvent,
    KVEvent,
    PrefillRequest,
    PrefillResult,
    ReadyEvent,
    SamplingParamsMsg,
    TokenEvent,
    parse_decode_event,
)

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.server.gateway.live_state import LiveState
    from prfaas.server.gateway.router import Router

# a decode node is taken for dead after a failed transfer to it only when its stream died or it
# missed this many state polls in a row (this far apart, seconds; each poll: STATE_TIMEOUT_S)
DECODE_PROBES = 2
DECODE_PROBE_PAUSE_S = 0.2
log = logging.getLogger("prfaas.server.router")
FINISH_REASONS = ("stop", "length")  # OpenAI's; anything else from a node is a failure


@dataclass
class RouteInfo:
    """What the response tells about its routing (``x-prfaas-*`` headers and the ``prfaas`` field)."""

    request_id: str
    prefill_cluster: str = ""
    prefill_node: str = ""
    decode_node: str = ""
    offloaded: bool = False
    cached_tokens: int = 0  # prompt tokens the prefill node took from its prefix cache
    decode_prefix_tokens: int = 0  # prompt tokens the decode node held: their KV did not cross
    transfer_bytes: int = 0  # KV payload bytes that crossed prefill -> decode
    transfer_wire_bytes: int = 0
    transfer_ms: float = 0.0
    prefill_ms: float = 0.0
    link: str | None = None
    reason: str = ""
    fallback_from: list[str] = field(default_factory=list)
    copied_from: str | None = None  # cluster a cached prefix was copied from (prefix pool)
    copied_tokens: int = 0
    copied_bytes: int = 0
    # where the time to the first token went, as time.time() stamps: the router's own (arrival,
    # decode_ready, prefill_sent, prefill_answered, kv_seen, first_token_seen), the prefill node's
    # ("p." + the keys of its answer's "timings") and the decode node's ("d." + its kv event's
    # "timings", and "d.first_token": the engine sampled the first token); one host's clock per
    # node (compare across hosts only as far as their clocks agree)
    timings: dict[str, float | None] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {
            "x-prfaas-request-id": self.request_id,
            "x-prfaas-prefill-cluster": self.prefill_cluster,
            "x-prfaas-prefill-node": self.prefill_node,
            "x-prfaas-decode-node": self.decode_node,
            "x-prfaas-cached-tokens": str(self.cached_tokens),
            "x-prfaas-decode-prefix-tokens": str(self.decode_prefix_tokens),
            "x-prfaas-transfer-bytes": str(self.transfer_bytes),
            "x-prfaas-transfer-ms": f"{self.transfer_ms:.3f}",
            "x-prfaas-fallback-from": ",".join(self.fallback_from),
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DecodeFailed(Exception):
    """The decode of a request failed mid-request: ``code`` ``request_failed`` (the request alone
    failed in the engine), else the decode node failed (``decode_failed``, ``aborted``)."""

    def __init__(self, message: str, code: str = "decode_failed") -> None:
        super().__init__(message)
        self.message, self.code = message, code

    def api_error(self) -> APIError:
        """The client's error: 500 ``request_failed`` or 502 ``decode_node_failed``."""
        if self.code == "request_failed":
            return APIError(500, self.message, "server_error", code="request_failed")
        return APIError(502, self.message, "server_error", code="decode_node_failed")


class DecodeStream:
    """The NDJSON event stream of one request from its decode node, read by a background task;
    ``on_dead(node)`` is called when the node fails mid-stream."""

    def __init__(
        self,
        nodes: NodeClient,
        ep: NodeEndpoint,
        rid: str,
        on_dead: Callable[[str], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.nodes, self.ep, self.rid, self.on_dead, self.spawn = nodes, ep, rid, on_dead, spawn
        self._closing = False
        self.queue: asyncio.Queue[DecodeEvent] = asyncio.Queue()
        self.resp: httpx.Response | None = None
        self.task: asyncio.Task | None = None
        self.dead: str | None = None
        self.ended: ErrorEvent | None = None  # the node ended the request with this (once read)

    async def open(
        self, prompt: list[int], params: SamplingParamsMsg, kv_timeout_s: float | None = None
    ) -> ReadyEvent:
        req = DecodeRequest(
            request_id=self.rid, prompt_token_ids=prompt, params=params, kv_timeout_s=kv_timeout_s
        )
        self.resp, lines = await self.nodes.open_decode(self.ep, req)
        line = await anext(lines, None)
        if line is None:
            raise DecodeFailed(f"decode node {self.ep.name} ended the stream before ready")
        try:
            first = parse_decode_event(line)
        except ValueError as e:  # DecodeFailed: the caller closes the stream, tries another node
            raise DecodeFailed(f"decode node {self.ep.name} answered {line[:200]!r}: {e}") from None
        if not isinstance(first, ReadyEvent):
            raise DecodeFailed(f"decode node {self.ep.name} answered {first}")
        self.task = asyncio.create_task(self._read(lines))
        return first

    async def _read(self, lines: AsyncIterator[str]) -> None:
        try:
            async for line in lines:
                if line.strip():
                    ev = parse_decode_event(line)
                    if isinstance(ev, ErrorEvent):
                        self.ended = ev
                    await self.queue.put(ev)
                    if isinstance(ev, ErrorEvent) or (isinstance(ev, TokenEvent) and ev.finished):
                        return
            self.dead = f"decode node {self.ep.name} closed the stream before the request finished"
        except (httpx.HTTPError, ValueError) as e:
            self.dead = f"decode node {self.ep.name} failed: {type(e).__name__}: {e}"
        except asyncio.CancelledError:
            return
        self.on_dead(self.ep.name)
        await self.queue.put(ErrorEvent(message=self.dead))

    async def next(self) -> DecodeEvent:
        return await self.queue.get()

    def close_soon(self, abort: bool) -> None:
        """Stop reading and close the node's stream, aborting the request there when ``abort``;
        the network part runs in a background task (safe to call while being cancelled)."""
        if self._closing:
            return
        self._closing = True
        if self.task is not None:
            self.task.cancel()
        self.spawn(self._close(abort and self.dead is None))

    async def _close(self, abort: bool) -> None:
        if abort:
            with contextlib.suppress(httpx.HTTPError):
                await self.nodes.abort(self.ep, self.rid)
        if self.task is not None:
            with contextlib.suppress(BaseException):
                await self.task
        if self.resp is not None:
            with contextlib.suppress(Exception):
                await self.resp.aclose()


class Generation:
    """One admitted request: its routing and the stream of new tokens (``events()``);
    ``on_close(gen, outcome)`` runs once when the response is over."""

    def __init__(
        self,
        route: RouteInfo,
        stream: DecodeStream,
        on_close: Callable[[Generation, str], None],
        arrival: float,
        prompt_tokens: int = 0,
    ) -> None:
        self.route, self.stream, self.on_close = route, stream, on_close
        self.prompt_tokens = prompt_tokens
        self.finished = False
        self.finish_reason: str | None = None
        self.arrival = arrival  # time.monotonic()
        self.first_token_at: float | None = None
        self.num_tokens = 0
        self._closed = False

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events with new tokens (or the last one); DecodeFailed on a failure."""
        while not self.finished:
            ev = await self.stream.next()
            if isinstance(ev, ErrorEvent):
                raise DecodeFailed(ev.message, ev.code)
            if not isinstance(ev, TokenEvent) or not (ev.token_ids or ev.finished):
                continue  # the import's own output carries no token: nothing for the client yet
            if ev.finished and ev.finish_reason not in FINISH_REASONS:
                raise DecodeFailed(f"the decode ended with {ev.finish_reason!r}")
            if ev.token_ids and self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.route.timings["first_token_seen"] = time.time()
                if ev.first_token_at is not None:
                    self.route.timings["d.first_token"] = ev.first_token_at
            self.num_tokens += len(ev.token_ids)
            self.finished = ev.finished
            if ev.finished:
                self.finish_reason = ev.finish_reason
            yield ev

    def close(self, outcome: str = "ok") -> None:
        """Always called once the response is over (aborts the decode if it is still running);
        synchronous, so a cancelled response still releases everything; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.on_close(self, outcome)
        self.stream.close_soon(abort=not self.finished)


async def prefill_and_handover(
    router: Router,
    info: RequestInfo,
    prompt: list[int],
    params: SamplingParamsMsg,
    decision: RouteDecision,
    stream: DecodeStream,
    ready: ReadyEvent,
    route: RouteInfo,
    decide: Callable[[RequestInfo], RouteDecision],
) -> None:
    """Prefill on the decided node (copy a cached prefix first if the decision says so), retrying
    on the node the policy picks next when one fails; returns once the decode node imported the KV.
    APIError 503 when every tried prefill node failed, 502 when the decode node failed."""
    token_start = ready.token_start
    kv_host, kv_port = ready.kv_addr
    tried: set[str] = set()
    live, timeout = router.live, router.cfg.router.prefill_timeout_s
    prefilled = False
    if decision.copy_from and decision.copy_tokens and router.kv is not None:
        dst_ep = router.by_cluster[decision.prefill_cluster][decision.prefill_instance]
        try:
            res = await router.kv.copy_prefix(
                prompt, decision.cached_len, decision.copy_from, dst_ep
            )
            route.copied_from = decision.copy_from if res.bytes else None
            route.copied_tokens, route.copied_bytes = res.tokens, res.bytes
        except (httpx.HTTPError, ValueError) as e:  # the prefill recomputes it
            log.warning("prefix copy from %s failed: %s", decision.copy_from, e)
    while True:
        ep = router.by_cluster[decision.prefill_cluster][decision.prefill_instance]
        if ep.name in tried:
            raise APIError(
                503, f"prefill failed on {sorted(tried)}", "server_error", code="prefill_failed"
            )
        req = PrefillRequest(
            request_id=info.request_id,
            prompt_token_ids=prompt,
            params=params,
            token_start=token_start,
            timeout_s=timeout,
            decode=DecodeTarget(cluster=router.pd, kv_host=kv_host, kv_port=kv_port),
        )
        route.timings["prefill_sent"] = time.time()
        try:
            res: PrefillResult = await router.nodes.prefill(ep, req, timeout + 10)
        except asyncio.CancelledError:  # the client went away: stop the prefill and its transfer
            router.spawn(router.nodes.abort_quietly(ep, info.request_id))
            raise
        except (httpx.HTTPError, PrefillFailed) as e:
            if stream.ended is not None:  # the decode node gave the request up: the KV had
                # nowhere to go, no prefill node is to blame, its error is the answer
                msg = f"decode node {stream.ep.name}: {stream.ended.message}"
                raise DecodeFailed(msg, stream.ended.code).api_error() from None
            dead = _kv_undelivered(e) and not await _decode_node_alive(router, stream)
            if dead and stream.dead is None:  # (its stream's reader may have seen it first)
                # the KV had nowhere to go: the decode node died, not the prefill node
                stream.dead = f"decode node {stream.ep.name} stopped answering"
                router.mark_down(stream.ep.name)
            if stream.dead is not None:
                raise APIError(
                    502, stream.dead, "server_error", code="decode_node_failed"
                ) from None
            log.warning("prefill on %s failed (%s); deciding again", ep.name, e)
            tried.add(ep.name)
            if isinstance(e, PrefillFailed):  # the node answered: this request failed there
                await live.refresh(router.nodes, ep)  # a link it reports cut counts at once
                if live.prefill_failed(ep.name):
                    log.warning(
                        "%s failed %d prefills in a row: down",
                        ep.name,
                        live.prefill_failures[ep.name],
                    )
            else:  # the node did not answer (refused, timed out, cut off): down until it does
                live.mark_down(ep.name)
            route.fallback_from.append(ep.name)
            router.metrics.fallbacks.labels(ep.cluster).inc()
            decision = _decide_without(live, decide, info, tried)
            prefilled = False  # routed anew: the observer waits for this prefill's end again
            continue
        live.prefill_ok(ep.name)
        route.timings["prefill_answered"] = time.time()
        if not prefilled:  # the observer: the prefill ended (before its transfer did), and the
            # node answers once its transfer is done: the KV is at the decode node, which admits
            # it to a slot or keeps it waiting for one (as the simulator's kv_delivered)
            prefilled = True
            router.sched.prefill_done(info.request_id, time.monotonic() - res.transfer_s)
            router.sched.kv_delivered(info.request_id)
        ev = await stream.next()
        if isinstance(ev, KVErrorEvent) and token_start > 0:
            token_start = 0  # the decode node lost the prefix meanwhile: send everything
            continue
        if not isinstance(ev, KVEvent):
            msg = getattr(ev, "message", None) or str(ev)
            code = ev.code if isinstance(ev, ErrorEvent) else "decode_failed"
            raise DecodeFailed(f"decode node {route.decode_node}: {msg}", code).api_error()
        break
    _record(router, info, prompt, decision, ep, res, ev, route)


def _decide_without(
    live: LiveState,
    decide: Callable[[RequestInfo], RouteDecision],
    info: RequestInfo,
    tried: set[str],
) -> RouteDecision:
    """The policy's next decision for ``info`` among the nodes it has not tried; APIError 503
    ``prefill_failed`` when none is left."""
    try:
        with live.excluding(tried):
            return decide(info)
    except APIError as e:
        if e.code != "no_capacity":
            raise
        raise APIError(
            503, f"prefill failed on {sorted(tried)}", "server_error", code="prefill_failed"
        ) from None


def _kv_undelivered(e: Exception) -> bool:
    """Whether a prefill failure can be the decode node's doing: the prefill node answered that
    its transfer of the KV to the decode node failed (503 ``transfer_failed``).  Any other failure
    (the prefill node refused the connection, lost its answer, timed out, answered ``wrong_role``)
    is the prefill node's alone."""
    return isinstance(e, PrefillFailed) and e.code == "transfer_failed"


async def _decode_node_alive(router: Router, stream: DecodeStream) -> bool:
    """Whether the decode node of ``stream`` is alive after a prefill node could not deliver the
    KV to it (so the prefill node is the one to blame): its stream has not died, and it answers
    one of ``DECODE_PROBES`` state polls in a row (``DECODE_PROBE_PAUSE_S`` apart).  A single
    missed poll (a busy node, one lost connection) condemns no node whose stream is open."""
    for k in range(DECODE_PROBES):
        if stream.dead is not None:
            return False
        if k:
            await asyncio.sleep(DECODE_PROBE_PAUSE_S)  # its stream's reader may notice a death
            if stream.dead is not None:
                return False
        try:
            await router.nodes.state(stream.ep)
        except (httpx.HTTPError, ValueError):
            continue
        return stream.dead is None
    return False


def _record(
    router: Router,
    info: RequestInfo,
    prompt: list[int],
    decision: RouteDecision,
    ep: NodeEndpoint,
    res: PrefillResult,
    ev: KVEvent,
    route: RouteInfo,
) -> None:
    """The routing bookkeeping of a finished hand-over (prefix index, KV manager, route, metrics)."""
    route.timings["kv_seen"] = time.time()
    for k, v in res.timings.items():
        route.timings[f"p.{k}"] = v
    for k, v in ev.timings.items():
        route.timings[f"d.{k}"] = v
    cluster = decision.prefill_cluster
    if router.kv is not None:
        router.kv.note_routed(info, decision, prompt)
    route.prefill_cluster, route.prefill_node = cluster, ep.name
    route.offloaded = cluster != router.pd
    route.cached_tokens = res.cached_tokens
    route.decode_prefix_tokens = res.token_start
    route.transfer_bytes = res.payload_bytes
    route.transfer_wire_bytes = res.wire_bytes
    route.transfer_ms = 1000 * res.transfer_s
    route.prefill_ms = 1000 * res.prefill_s
    route.link = res.link
    route.reason = decision.reason
    m = router.metrics
    m.decisions.labels(cluster, str(route.offloaded).lower()).inc()
    m.transfer_bytes.labels(cluster, router.pd).inc(route.transfer_wire_bytes)
    m.transfer_seconds.labels(cluster, router.pd).observe(res.transfer_s)
