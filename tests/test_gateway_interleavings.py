"""Random interleavings of many concurrent requests through the gateway's request path (``Router``:
admission, routing, the decode stream, prefill and hand-over with retries, ``Generation``; and the
OpenAI routes on top of it: several prompts and ``n`` choices, streaming or not, stop strings, echo
and logprobs, a server that begins to stop) against fake nodes (``httpx.MockTransport``, no process,
no socket) whose behaviour is drawn per call: a prefill answers, fails (503), answers
``wrong_role``, refuses the request (400), refuses the connection, loses its answer or is slow; a
decode node answers the open, answers that it is full (``overloaded``) or ``wrong_role``, refuses
the connection or never answers (no headers, or no ``ready`` line: ``OPEN_TIMEOUT_S``), and its
stream sends ``ready``, ``kv`` (or a ``kv_error`` first), the tokens and ``finished``, or dies on
the way, or ends with an error event; any node misses a state poll now and then (a decode node
at most one in ``DECODE_MISS_GAP_S``); clients go away at random points (task cancelled; over HTTP:
``http.disconnect``).

Whatever the order, every request ends (bounded time) with its complete answer (the exact tokens
the fake decode node streams, the text the gateway's own assembler makes of them) or a clear error
with one of the documented codes, never a truncated answer; an error needs a fault of that
request's own (a 503 ``no_capacity`` may also come from nodes others' faults took down); and at the
end nothing is held: no admission slot, no request in the scheduler's observer, no background task,
no decode stream left open, and every node a request left while it ran there got its abort.

Fake time is event-loop turns (``turns``), not seconds, so a loaded machine does not change the
interleaving (the observer's busy estimates read the clock, so the choice between two equal
prefill nodes may); only a decode open that hangs waits real time (``OPEN_TIMEOUT_S``).  ``PRFAAS_GW_SEEDS=200`` runs more seeds.  The focused tests at the end are
what the random scenarios found, one at a time, and the weaknesses they were extended for.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from prfaas.scheduling.live import SwitchInProgress
from prfaas.scheduling.types import Role
from prfaas.server.config import parse_deploy_config
from prfaas.server.gateway.api import build_gateway_app
from prfaas.server.gateway.handover import DecodeFailed
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.gateway.router import Router
from prfaas.server.gateway.text_output import TextAssembler
from prfaas.server.protocol import (
    AbortResult,
    DecodeRequest,
    ErrorBody,
    ErrorDetail,
    ErrorEvent,
    KVErrorEvent,
    KVEvent,
    LinkReading,
    Message,
    NodeState,
    PrefillRequest,
    PrefillResult,
    PromptScore,
    PromptScoreResult,
    ReadyEvent,
    SamplingParamsMsg,
    TokenEvent,
    TokenLogprobMsg,
)
from prfaas.tokenizer import ByteTokenizer

NODES = {  # name: (cluster, role)
    "f0": ("prfaas", "prefill"),
    "p0": ("pd", "prefill"),
    "p1": ("pd", "prefill"),
    "d0": ("pd", "decode"),
    "d1": ("pd", "decode"),
}
CFG = {
    "model": "tiny",
    "secret": "unit-secret-0123456789",
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [{"name": n, "role": NODES[n][1]} for n in ("p0", "p1", "d0", "d1")],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0, "rtt_ms": 5}],
    "router": {"threshold": 256, "rebalance": False},
}
N_REQ = 36
SEEDS = range(int(os.environ.get("PRFAAS_GW_SEEDS", "10")))  # more for a soak run

# what a node does with one call, and how often (weights)
PREFILL = {
    "ok": 70,
    "slow": 10,
    "fail": 7,
    "wrong_role": 3,
    "refused": 7,
    "bad_request": 1,
    "lost_answer": 3,  # the KV went over, then the connection broke before the answer
}
OPEN = {"ok": 80, "slow": 8, "overloaded": 3, "wrong_role": 1, "refused": 3, "hang": 1}
# real seconds between two random state-poll misses of one decode node (25x the pause between
# the gateway's two probes of a decode node: no request sees one miss twice in a row)
DECODE_MISS_GAP_S = 5.0
OPEN_TIMEOUT_S = 0.15  # router.decode_open_timeout_s here (real seconds; a hang reaches it, a
# slow open on a loaded machine may too: then that request goes elsewhere, as for a hang)
STREAM = {
    "ok": 60,
    "kv_error": 8,  # the import refuses the first KV (the node lost the prefix meanwhile)
    "die_at_once": 3,  # the connection breaks before the ready line
    "empty": 2,  # the stream ends before the ready line
    "garbage": 1,  # a first line that is no event (a node of another version, a proxy)
    "no_ready": 1,  # the headers, then nothing (until the gateway aborts the request)
    "die_after_ready": 4,
    "die_mid_tokens": 6,
    "error_before_kv": 4,  # e.g. no KV within kv_timeout_s
    "error_at_once": 2,  # the node's engine failed: every request it holds ends at once
    "error_mid_tokens": 5,  # the request failed in the engine
    "bad_finish": 2,  # a finish reason that is not OpenAI's
}
DECODE_FAULTS = set(STREAM) - {"ok"}
SCORE = {"ok": 80, "fail": 10, "refused": 10}  # echo with logprobs: a prefill node scores


async def turns(n: int) -> None:
    """Let the event loop run ``n`` times (the fakes' unit of time)."""
    for _ in range(n):
        await asyncio.sleep(0)


def draw(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake decode node generates for ``prompt``."""
    return [(prompt[0] * 31 + prompt[-1] + 7 * i) % 80 + 40 for i in range(max_tokens)]  # ASCII


def line(ev: Message) -> bytes:
    return ev.to_json() + b"\n"


def error_response(status: int, code: str, message: str) -> httpx.Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message)).to_json()
    return httpx.Response(status, content=body)


@dataclass
class Expect:
    """One decode stream a fake decode node serves."""

    node: str
    rid: str
    client: int
    prompt: list[int]
    max_tokens: int
    token_start: int
    plan: str
    logprobs: int | None = None  # the request asked for them: one per token
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # KV token_start | "abort"
    closed: bool = False  # the gateway closed the response (the real node then drops it)
    ended: bool = False  # the node sent its last event (finished or error)
    died: bool = False  # the connection broke (the node's fault)


class DecodeBody(httpx.AsyncByteStream):
    """A decode node's NDJSON stream of one request, as its plan says."""

    def __init__(self, fake: FakeNodes, exp: Expect) -> None:
        self.fake, self.exp = fake, exp

    def _end(self, ev: Message) -> bytes:
        self.exp.ended = True
        return line(ev)

    def _die(self) -> httpx.HTTPError:
        self.exp.died = True
        return httpx.ReadError(f"{self.exp.node}: connection reset")

    async def __aiter__(self):  # noqa: ANN204 - an async generator
        exp, rng = self.exp, self.fake.rng
        if exp.plan == "die_at_once":
            raise self._die()
        if exp.plan == "empty":
            exp.died = True
            return
        if exp.plan == "garbage":
            yield self._end(Message())
            return
        if exp.plan == "no_ready":
            await exp.inbox.get()  # only an abort comes
            yield self._end(ErrorEvent(message="aborted by the router", code="aborted"))
            return
        yield line(ReadyEvent(node=exp.node, token_start=exp.token_start, kv_addr=(exp.node, 1)))
        if exp.plan == "error_at_once":
            yield self._end(ErrorEvent(message="the engine step failed"))
            return
        if exp.plan in ("die_after_ready", "error_before_kv"):
            await turns(rng.randrange(1, 40))
            if exp.plan == "die_after_ready":
                raise self._die()
            yield self._end(ErrorEvent(message="no KV within kv_timeout_s"))
            return
        kv_errors = 1 if exp.plan == "kv_error" else 0
        while True:
            item = await exp.inbox.get()
            if item == "abort":
                yield self._end(ErrorEvent(message="aborted by the router", code="aborted"))
                return
            if kv_errors:
                kv_errors -= 1
                yield line(KVErrorEvent(message="the prefix was evicted"))
                continue
            yield line(
                KVEvent(
                    token_start=item, payload_bytes=10, wire_bytes=11, receive_s=0.0, timings={}
                )
            )
            break
        toks = expected_tokens(exp.prompt, exp.max_tokens)
        cut = rng.randrange(len(toks))  # where a mid-stream fault strikes
        i = 0
        while True:
            await turns(rng.randrange(0, 12))
            if not exp.inbox.empty() and exp.inbox.get_nowait() == "abort":
                yield self._end(ErrorEvent(message="aborted by the router", code="aborted"))
                return
            if i >= cut and exp.plan == "die_mid_tokens":
                raise self._die()
            if i >= cut and exp.plan == "error_mid_tokens":
                yield self._end(ErrorEvent(message="sampling failed", code="request_failed"))
                return
            k = rng.randrange(1, 4)
            chunk, i = toks[i : i + k], i + k
            lps = None
            if exp.logprobs is not None:
                lps = [TokenLogprobMsg(token_id=t, logprob=-1.0) for t in chunk]
            if i < len(toks):
                yield line(TokenEvent(token_ids=chunk, logprobs=lps, finished=False))
                continue
            reason = "abort" if exp.plan == "bad_finish" else "length"
            end = TokenEvent(token_ids=chunk, logprobs=lps, finished=True, finish_reason=reason)
            yield self._end(end)
            return

    async def aclose(self) -> None:
        self.exp.closed = True


class FakeNodes:
    """Every node's control routes (an async ``httpx.MockTransport`` handler); what each call does
    is drawn from ``rng``.  Records what the gateway did to the nodes."""

    def __init__(self, rng: random.Random, script: dict[str, list[str]] | None = None) -> None:
        self.rng = rng
        self.script = script or {}  # what -> its next draws, in order (then: random)
        self.p_refuse = {"state": 0.03, "abort": 0.05}  # calls refused now and then
        self.expect: dict[tuple[str, str], Expect] = {}
        self.opened: list[Expect] = []
        self.abort_calls: set[tuple[str, str]] = set()  # (node, rid), reached or not
        self.cancelled: set[tuple[str, str, str]] = set()  # (kind, node, rid) left mid-call
        self.faults: dict[int, list[str]] = {}  # client -> the faults its calls drew
        self.rids: dict[str, int] = {}  # request id -> client
        self.shutdown = False  # the gateway began to stop (its responses end with 503)
        self.state_misses: dict[str, int] = {}  # node -> state polls it misses next (scripted)
        self.missed_at: dict[str, float] = {}  # decode node -> its last random miss (monotonic)
        self.roles: dict[str, str] = {}  # node -> the role it reports, when not NODES' one

    def draw(self, what: str, weights: dict[str, int]) -> str:
        forced = self.script.get(what)
        return forced.pop(0) if forced else draw(self.rng, weights)

    def fault(self, client: int, what: str) -> None:
        self.faults.setdefault(client, []).append(what)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        node, path = request.url.host, request.url.path
        if path == "/state":
            # a prefill node misses polls at random; a decode node too, at most one in any
            # DECODE_MISS_GAP_S (two in a row after a transfer to it failed, DECODE_PROBE_PAUSE_S
            # apart: taken for dead, its request ends with 502)
            cluster, role = NODES[node]
            role = self.roles.get(node, role)
            if self.state_misses.get(node, 0) > 0:
                self.state_misses[node] -= 1
                raise httpx.ConnectError("connection refused", request=request)
            now = time.monotonic()
            calm = role == "prefill" or now - self.missed_at.get(node, -1e9) > DECODE_MISS_GAP_S
            if calm and self.rng.random() < self.p_refuse["state"]:
                self.missed_at[node] = now
                raise httpx.ConnectError("connection refused", request=request)
            links = {"pd": LinkReading(up=True)} if cluster == "prfaas" else {}
            st = NodeState(name=node, cluster=cluster, role=role, pid=1, links=links)
            return httpx.Response(200, content=st.to_json())
        if path.startswith("/internal/abort/"):
            return await self.abort(node, path.rsplit("/", 1)[1], request)
        if path == "/internal/prefill":
            return await self.prefill(node, PrefillRequest.model_validate_json(request.content))
        if path == "/internal/decode":
            return await self.open(node, DecodeRequest.model_validate_json(request.content))
        if path == "/internal/prompt_logprobs":
            return await self.score(node, PromptScore.model_validate_json(request.content))
        raise AssertionError(f"unexpected call {path}")

    async def prefill(self, node: str, req: PrefillRequest) -> httpx.Response:
        rid, client = req.request_id, req.prompt_token_ids[0]
        self.rids[rid] = client
        kind = self.draw("prefill", PREFILL)
        try:
            await turns(self.rng.randrange(20, 80) if kind == "slow" else self.rng.randrange(3))
        except asyncio.CancelledError:  # the gateway left: the node keeps the work until aborted
            self.cancelled.add(("prefill", node, rid))
            raise
        if kind in ("fail", "wrong_role", "refused", "bad_request"):
            self.fault(client, f"prefill_{kind}")
        if kind == "refused":
            raise httpx.ConnectError("connection refused")
        if kind == "fail":
            return error_response(503, "transfer_failed", "TransferError: peer reset")
        if kind == "wrong_role":
            return error_response(400, "wrong_role", f"{node} is a decode node")
        if kind == "bad_request":
            return error_response(400, "bad_request", "the prompt does not fit")
        exp = self.expect.get((req.decode.kv_host, rid))
        if exp is None or exp.closed or exp.ended or exp.died:  # nobody takes the KV
            self.fault(client, "prefill_no_receiver")
            return error_response(503, "transfer_failed", "TransferError: refused")
        exp.inbox.put_nowait(req.token_start)
        if kind == "lost_answer":
            self.fault(client, "prefill_lost_answer")
            raise httpx.ReadError("connection reset")
        res = PrefillResult(
            request_id=rid,
            node=node,
            cluster=NODES[node][0],
            prompt_tokens=len(req.prompt_token_ids),
            cached_tokens=0,
            token_start=req.token_start,
            payload_bytes=10,
            wire_bytes=11,
            prefill_s=0.0,
            transfer_s=0.0,
            link=None,
            timings={},
        )
        return httpx.Response(200, content=res.to_json())

    async def open(self, node: str, req: DecodeRequest) -> httpx.Response:
        rid, client = req.request_id, req.prompt_token_ids[0]
        self.rids[rid] = client
        kind = self.draw("open", OPEN)
        try:
            await turns(self.rng.randrange(10, 40) if kind == "slow" else self.rng.randrange(3))
            if kind == "hang":  # accepted the connection, never answers
                self.fault(client, "open_hang")
                await asyncio.Event().wait()
        except asyncio.CancelledError:  # the node may hold the request already
            self.cancelled.add(("open", node, rid))
            raise
        if kind not in ("ok", "slow"):
            self.fault(client, f"open_{kind}")
        if kind == "refused":
            raise httpx.ConnectError("connection refused")
        if kind == "overloaded":
            return error_response(503, "overloaded", f"{node} holds too many requests")
        if kind == "wrong_role":
            return error_response(400, "wrong_role", f"{node} is a prefill node")
        if (node, rid) in self.abort_calls:  # as the real node: a late open is refused
            return error_response(409, "aborted", f"request {rid!r} was aborted")
        plan = self.draw("stream", STREAM)
        if plan in DECODE_FAULTS:
            self.fault(client, f"stream_{plan}")
        prompt = req.prompt_token_ids
        token_start = int(self.draw("token_start", {"0": 1, "64": 1})) if len(prompt) > 64 else 0
        mt, lps = req.params.max_tokens, req.params.logprobs
        exp = Expect(node, rid, client, prompt, mt, token_start, plan, lps)
        self.expect[(node, rid)] = exp
        self.opened.append(exp)
        return httpx.Response(200, stream=DecodeBody(self, exp))

    async def score(self, node: str, req: PromptScore) -> httpx.Response:
        client = req.prompt_token_ids[0]
        kind = self.draw("score", SCORE)
        await turns(self.rng.randrange(3))
        if kind != "ok":
            self.fault(client, f"score_{kind}")
        if kind == "refused":
            raise httpx.ConnectError("connection refused")
        if kind == "fail":
            return error_response(503, "busy", "scoring failed")
        lps = [TokenLogprobMsg(token_id=t, logprob=-1.0) for t in req.prompt_token_ids[1:]]
        return httpx.Response(200, content=PromptScoreResult(logprobs=lps).to_json())

    async def abort(self, node: str, rid: str, request: httpx.Request) -> httpx.Response:
        self.abort_calls.add((node, rid))
        if self.rng.random() < self.p_refuse["abort"]:
            raise httpx.ConnectError("connection refused", request=request)
        exp = self.expect.get((node, rid))
        held = exp is not None and not (exp.closed or exp.ended or exp.died)
        if held:
            exp.inbox.put_nowait("abort")
        return httpx.Response(200, content=AbortResult(aborted=held).to_json())


def make_router(fake: FakeNodes, max_inflight: int = 12, **timeouts: float) -> Router:
    """The gateway's router over ``fake``; ``timeouts``: router settings (default: a decode open
    gets ``OPEN_TIMEOUT_S``)."""
    timeouts.setdefault("decode_open_timeout_s", OPEN_TIMEOUT_S)
    router_cfg = {**CFG["router"], "max_inflight": max_inflight}
    cfg = parse_deploy_config({**CFG, "router": {**router_cfg, **timeouts}})
    eps = [NodeEndpoint(n, c, r, f"http://{n}") for n, (c, r) in NODES.items()]
    router = Router(cfg, eps)
    router.nodes = NodeClient(cfg.secret, httpx.AsyncClient(transport=httpx.MockTransport(fake)))
    return router


async def poller(router: Router, stop: asyncio.Event) -> None:
    """The gateway's poll, every 10 turns (a node marked down comes back once it answers)."""
    while not stop.is_set():
        await router.poll_once()
        await turns(10)


@dataclass
class Client:
    k: int
    prompt: list[int]
    max_tokens: int
    start: int  # turns before it sends
    cancel_at: int | None  # turns after it sent, when it goes away
    outcome: tuple = ()


def make_clients(rng: random.Random) -> list[Client]:
    out = []
    for k in range(N_REQ):
        n = rng.randrange(80, 420)  # both sides of the threshold: PrfaaS and PD-P prefills
        prompt = [k] + [rng.randrange(256) for _ in range(n - 1)]  # prompt[0]: the client
        cancel = rng.randrange(0, 80) if rng.random() < 0.35 else None
        out.append(Client(k, prompt, rng.randrange(1, 9), rng.randrange(0, 60), cancel))
    return out


async def run_client(router: Router, c: Client) -> None:
    """One request as the API drives it: generate, read every token, close."""
    await turns(c.start)
    try:
        gen = await router.generate(c.prompt, SamplingParamsMsg(max_tokens=c.max_tokens))
    except APIError as e:
        c.outcome = ("api_error", e.status, e.code)
        return
    outcome, toks = "cancelled", []
    try:
        async for ev in gen.events():
            toks += ev.token_ids
        outcome = "ok"
        c.outcome = ("ok", toks, gen.finish_reason)
    except DecodeFailed as e:
        outcome = "decode_failed"
        c.outcome = ("decode_failed", e.code)
    finally:
        gen.close(outcome)


API_ERRORS = {  # (status, code) a request may end with, and which faults of its own explain it
    (400, None): {"prefill_bad_request"},
    (429, "overloaded"): None,  # admission: too many in flight (any request)
    (503, "no_capacity"): None,  # every node of a role down (others' faults count)
    (503, "prefill_failed"): {  # a prefill node of its own failed it (not a decode node)
        "prefill_fail",
        "prefill_refused",
        "prefill_wrong_role",
        "prefill_lost_answer",
    },
    (502, "decode_node_failed"): DECODE_FAULTS,
    (500, "request_failed"): DECODE_FAULTS,
    (503, None): None,  # echo with logprobs: no prefill node scored the prompt
}


def check_outcome(c: Client, fake: FakeNodes) -> None:
    faults = {f.removeprefix("stream_") for f in fake.faults.get(c.k, [])}
    kind = c.outcome[0]
    if kind == "ok":
        _, toks, reason = c.outcome
        assert toks == expected_tokens(c.prompt, c.max_tokens), f"client {c.k}: truncated"
        assert reason == "length"
    elif kind == "api_error":
        _, status, code = c.outcome
        assert (status, code) in API_ERRORS, f"client {c.k}: undocumented error {c.outcome}"
        need = API_ERRORS[(status, code)]
        assert need is None or faults & need, f"client {c.k}: {c.outcome} without a fault"
    elif kind == "decode_failed":
        assert c.outcome[1] in ("decode_failed", "request_failed"), c.outcome
        assert faults & DECODE_FAULTS, f"client {c.k}: decode failed without a fault"
    else:
        assert kind == "cancelled" and c.cancel_at is not None, f"client {c.k}: {c.outcome}"


def requests_counted(router: Router) -> float:
    """``prfaas_requests_total`` over every outcome (429s included)."""
    return sum(
        s.value
        for m in router.metrics.registry.collect()
        if m.name == "prfaas_requests"
        for s in m.samples
        if s.name == "prfaas_requests_total"
    )


def check_nothing_held(router: Router, fake: FakeNodes, n_generate: int | None = None) -> None:
    """Nothing is held at the end; ``n_generate``: the requests sent, each counted once."""
    assert router.admission.inflight == 0
    if n_generate is not None:
        assert requests_counted(router) == n_generate, "a request released twice or never"
    obs = router.sched.observer
    assert obs.pending() == 0, "routed requests the observer still holds"
    for cs in router.build_state().clusters.values():
        if cs.prefill is not None:
            assert set(cs.prefill.queue_reqs) <= {0} and set(cs.prefill.queue_tokens) <= {0}
        if cs.decode is not None:
            assert set(cs.decode.slots_used) <= {0} and set(cs.decode.waiting) <= {0}
    assert not router._bg, "background clean-up still running"  # noqa: SLF001
    left_open = [(e.node, e.client, e.plan) for e in fake.opened if not e.closed]
    assert not left_open, f"decode streams never closed: {left_open}"
    for kind, node, rid in fake.cancelled:  # the gateway left mid-call: the node must hear of it
        assert (node, rid) in fake.abort_calls, f"{kind} of client {fake.rids[rid]} on {node}"
    for e in fake.opened:  # a stream the gateway closed while it ran: the request aborted there
        if not (e.ended or e.died):
            assert (e.node, e.rid) in fake.abort_calls, f"client {e.client} not aborted"


@pytest.mark.parametrize("seed", SEEDS)
def test_router_requests_end_clearly_and_release_everything(seed):
    rng = random.Random(seed)
    fake = FakeNodes(random.Random(seed + 1000))
    clients = make_clients(rng)

    async def scenario() -> None:
        router = make_router(fake)
        stop = asyncio.Event()
        poll = asyncio.create_task(poller(router, stop))
        tasks = [asyncio.create_task(run_client(router, c)) for c in clients]

        async def cancel(c: Client, t: asyncio.Task) -> None:
            await turns(c.start + c.cancel_at)
            t.cancel()

        cancels = [
            asyncio.create_task(cancel(c, t))
            for c, t in zip(clients, tasks, strict=True)
            if c.cancel_at is not None
        ]
        done, pending = await asyncio.wait(tasks, timeout=60)
        assert not pending, f"requests that never ended: {len(pending)}"
        for c, t in zip(clients, tasks, strict=True):
            if t.cancelled():
                c.outcome = ("cancelled",)
            elif t.exception() is not None:
                c.outcome = ("exception", repr(t.exception()))
        await asyncio.gather(*cancels)
        stop.set()
        await poll
        await router.stop()  # waits for the background clean-up (aborts, stream closes)
        for c in clients:
            check_outcome(c, fake)
        check_nothing_held(router, fake, n_generate=len(clients))
        # the draws did reach the paths this test is about
        outcomes = {c.outcome[0] for c in clients}
        assert "ok" in outcomes and len(outcomes) >= 2, outcomes

    asyncio.run(scenario())


# ---- the same through the OpenAI routes: choices, streaming, stop strings, clients that leave ---


async def asgi_post(
    app, path: str, body: dict, leave: asyncio.Event, leave_after: int | None = None
) -> tuple[int, bytes]:
    """POST ``body`` to the ASGI ``app`` as one client that goes away once ``leave`` is set (or
    it received ``leave_after`` body parts), as a server tells it: ``http.disconnect``; the status
    and the body bytes it received."""
    raw, asked = json.dumps(body).encode(), False
    status, chunks = 0, []

    async def receive() -> dict:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))
            if leave_after is not None and len(chunks) >= leave_after:
                leave.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return status, b"".join(chunks)


@dataclass
class ApiClient:
    k: int
    prompts: list[list[int]]
    n: int
    max_tokens: int
    stream: bool
    stop: list[str]
    start: int
    leave_at: int | None
    leave_after: int | None = None  # or: once it received this many parts of the body
    usage: bool = False  # stream_options.include_usage
    echo: bool = False  # the prompt's text first
    logprobs: int | None = None
    prompt_only: bool = False  # echo with max_tokens 0: the prompt alone
    status: int = 0
    body: bytes = b""
    left: bool = False

    def want(self, index: int) -> tuple[str, str]:
        """Choice ``index``'s whole text and finish reason (as the gateway's own assembler)."""
        prompt = self.prompts[index // self.n]
        prefix = ByteTokenizer().decode(prompt) if self.echo else ""
        if self.prompt_only:
            return prefix, "length"
        asm = TextAssembler(ByteTokenizer(), self.stop)
        asm.add(expected_tokens(prompt, self.max_tokens))
        asm.finish()
        return prefix + asm.text, "stop" if asm.stopped else "length"


def make_api_clients(rng: random.Random, n_clients: int) -> list[ApiClient]:
    out = []
    for k in range(n_clients):
        prompts = [
            [k] + [rng.randrange(256) for _ in range(rng.randrange(80, 420) - 1)]
            for _ in range(rng.choice((1, 1, 1, 2)))
        ]
        m = rng.randrange(1, 17)
        c = ApiClient(k, prompts, rng.choice((1, 1, 2)), m, rng.random() < 0.6, [], 0, None)
        if rng.random() < 0.3:  # a stop string somewhere in the first choice's text
            text = c.want(0)[0]
            j = rng.randrange(len(text))
            c.stop = [text[j : j + 2]]
        if rng.random() < 0.25:
            c.echo = True
            c.logprobs = rng.choice((None, 0, 2))
            c.prompt_only = rng.random() < 0.3
        elif rng.random() < 0.2:
            c.logprobs = 1
        c.start = rng.randrange(0, 60)
        c.leave_at = rng.randrange(0, 150) if rng.random() < 0.3 else None
        c.usage = c.stream and rng.random() < 0.3
        if c.stream and c.leave_at is None and rng.random() < 0.4:
            c.leave_after = rng.randrange(1, 5)  # mid-stream
        out.append(c)
    return out


def sse_events(body: bytes) -> list:
    out = []
    for part in body.decode().split("\n\n"):
        if part:
            assert part.startswith("data: "), part
            data = part.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def check_api_error(c: ApiClient, status: int, err: dict, fake: FakeNodes) -> None:
    faults = {f.removeprefix("stream_") for f in fake.faults.get(c.k, [])}
    if (status, err["code"]) == (503, "server_shutdown") and fake.shutdown:
        return
    assert (status, err["code"]) in API_ERRORS, f"client {c.k}: undocumented {status} {err}"
    need = API_ERRORS[(status, err["code"])]
    assert need is None or faults & need, f"client {c.k}: {status} {err} without a fault"


def check_api_outcome(c: ApiClient, fake: FakeNodes) -> None:
    n_choices = len(c.prompts) * c.n
    if c.status == 499:
        assert c.left, f"client {c.k}: 499 but it stayed"
        return
    if c.status != 200:
        assert c.body, f"client {c.k}: {c.status} without a body"
        check_api_error(c, c.status, json.loads(c.body)["error"], fake)
        return
    if not c.stream:
        body = json.loads(c.body)
        got = {ch["index"]: (ch["text"], ch["finish_reason"]) for ch in body["choices"]}
        assert got == {i: c.want(i) for i in range(n_choices)}, f"client {c.k}: {got}"
        return
    events = sse_events(c.body)
    if not c.left:
        assert events and events[-1] == "[DONE]", f"client {c.k}: stream not ended"
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    errors = []
    for ev in events:
        if ev == "[DONE]":
            assert ev is events[-1]
            continue
        if "error" in ev:
            errors.append(ev["error"])
            continue
        for ch in ev["choices"]:
            i = ch["index"]
            assert i not in finish, f"client {c.k}: choice {i} went on after its finish"
            text[i] = text.get(i, "") + ch["text"]
            if ch["finish_reason"] is not None:
                finish[i] = ch["finish_reason"]
    for i, t in text.items():  # whatever arrived is the start of the answer, never another one
        assert c.want(i)[0].startswith(t), f"client {c.k} choice {i}: {t!r}"
    for i, f in finish.items():
        assert (text.get(i, ""), f) == c.want(i), f"client {c.k} choice {i}: truncated"
    if errors:
        assert len(errors) == 1 and events[-2]["error"] is errors[0], f"client {c.k}: {events}"
        code = errors[0]["code"]  # SSE: no status
        status = {"request_failed": 500, "server_shutdown": 503}.get(code, 502)
        check_api_error(c, status, errors[0], fake)
    elif not c.left:
        assert len(finish) == n_choices, f"client {c.k}: {finish}, {n_choices} choices"
        if c.usage:  # the last chunk: no choices, the usage (each prompt once, as OpenAI)
            n_prompt = sum(len(p) for p in c.prompts)
            assert events[-2]["choices"] == [], events[-2]
            assert events[-2]["usage"]["prompt_tokens"] == n_prompt, events[-2]


@pytest.mark.parametrize("seed", SEEDS)
def test_openai_requests_end_clearly_and_release_everything(seed):
    rng = random.Random(seed)
    fake = FakeNodes(random.Random(seed + 2000))
    clients = make_api_clients(rng, 24)

    async def scenario() -> None:
        router = make_router(fake, max_inflight=10)  # a later choice may get a 429
        app = build_gateway_app(router)  # no lifespan: the poller below stands for it
        n_generate, generate = 0, router.generate

        async def counted(prompt: list[int], params: SamplingParamsMsg):  # noqa: ANN202
            nonlocal n_generate
            n_generate += 1
            return await generate(prompt, params)

        router.generate = counted  # the routes call it through the router object
        stop = asyncio.Event()
        poll = asyncio.create_task(poller(router, stop))

        async def one(c: ApiClient) -> None:
            await turns(c.start)
            leave = asyncio.Event()
            if c.leave_at is not None:

                async def go() -> None:
                    await turns(c.leave_at)
                    c.left = True
                    leave.set()

                asyncio.get_running_loop().create_task(go())
            body = {"model": "tiny", "prompt": c.prompts if len(c.prompts) > 1 else c.prompts[0]}
            body.update(max_tokens=c.max_tokens, n=c.n, stream=c.stream)
            if c.stop:
                body["stop"] = c.stop
            if c.echo:
                body.update(echo=True, max_tokens=0 if c.prompt_only else c.max_tokens)
            if c.logprobs is not None:
                body["logprobs"] = c.logprobs
            if c.usage:
                body["stream_options"] = {"include_usage": True}
            c.status, c.body = await asgi_post(app, "/v1/completions", body, leave, c.leave_after)
            c.left = c.left or leave.is_set()

        tasks = [asyncio.create_task(one(c)) for c in clients]
        if seed % 4 == 3:  # the server begins to stop while requests run

            async def shutdown() -> None:
                await turns(rng.randrange(40, 160))
                fake.shutdown = True
                app.state.begin_shutdown()

            tasks.append(asyncio.create_task(shutdown()))
        done, pending = await asyncio.wait(tasks, timeout=60)
        assert not pending, f"responses that never ended: {len(pending)}"
        for t in tasks:
            t.result()  # nothing escaped the app (an unexpected error is a 500 body)
        await turns(200)  # clients' leave timers
        stop.set()
        await poll
        await router.stop()
        for c in clients:
            check_api_outcome(c, fake)
        check_nothing_held(router, fake, n_generate)
        statuses = {c.status for c in clients}
        assert 200 in statuses and len(statuses) >= 2, statuses

    asyncio.run(scenario())


# ---- what the random scenarios found, one at a time ------------------------------------------


def quiet_fake(script: dict[str, list[str]]) -> FakeNodes:
    """Fake nodes doing what ``script`` says (then: as drawn), every state poll and abort answered."""
    fake = FakeNodes(random.Random(0), script)
    fake.p_refuse = {"state": 0.0, "abort": 0.0}
    return fake


@pytest.mark.parametrize("plan", ["empty", "garbage"])
def test_a_decode_stream_without_its_ready_line_is_a_node_failure(plan):
    """(Seeds 0, 3 and 5 of the random scenario.)  A decode node whose stream ended before its
    ``ready`` line let ``StopAsyncIteration`` out of ``Router.generate`` (the client got a 500
    ``internal_error``, the other decode node was never tried); a first line that is no event
    let a ``ValueError`` out the same way and left the node's response open.  Both are now that
    node failing the open: it is closed, marked down, and the request goes to the other one."""
    fake = quiet_fake({"open": ["ok", "ok"], "stream": [plan, "ok"], "prefill": ["ok"]})
    prompt = [0] + [random.Random(1).randrange(256) for _ in range(99)]

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        c = Client(0, prompt, 5, 0, None)
        await run_client(router, c)
        assert c.outcome == ("ok", expected_tokens(prompt, 5), "length")
        first, second = fake.opened
        assert (first.plan, second.plan) == (plan, "ok") and first.node != second.node
        assert not router.live.node_up[first.node]
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


def test_a_request_routed_again_after_its_prefill_is_counted_prefilled_once_more():
    """The observer's view of a request whose KV the decode node refused (it lost the prefix:
    everything is sent again) and whose second prefill then failed: the retry routes it anew
    (its prefill is queued on the next node again), so its prefill's end and the KV's delivery
    must be told again when the retry succeeds; else the observer shows its prefill queued (and
    no decode slot taken) for as long as it decodes."""
    fake = quiet_fake(
        {
            "open": ["ok"],
            "stream": ["kv_error"],
            "token_start": ["64"],
            "prefill": ["ok", "fail", "ok"],
        }
    )
    prompt = [0] + [random.Random(2).randrange(256) for _ in range(299)]

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        gen = await router.generate(prompt, SamplingParamsMsg(max_tokens=3))
        assert len(gen.route.fallback_from) == 1  # the second prefill failed, the third did not
        st = router.build_state()
        assert [sum(c.prefill.queue_reqs) for c in st.clusters.values()] == [0, 0]
        assert sum(st.clusters["pd"].decode.slots_used) == 1
        toks = [t async for ev in gen.events() for t in ev.token_ids]
        gen.close("ok")
        assert toks == expected_tokens(prompt, 3)
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


def test_a_scoring_node_that_does_not_answer_is_a_503():
    """(Seed 9 of the OpenAI scenario.)  ``echo`` with ``logprobs`` asks a prefill node to score
    the prompt; one that refused the connection let ``httpx.ConnectError`` out of the route (a
    500 ``internal_error`` and a logged traceback).  Now it is a 503 like a node that answered
    with an error, the node is down until a poll finds it, and the choice already started is
    aborted on its decode node."""
    fake = quiet_fake({"score": ["refused"], "open": ["ok"], "stream": ["ok"], "prefill": ["ok"]})
    prompt = [0] + [random.Random(3).randrange(256) for _ in range(99)]

    async def scenario() -> None:
        router = make_router(fake)
        app = build_gateway_app(router)
        await router.poll_once()
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1}
        status, raw = await asgi_post(app, "/v1/completions", body, asyncio.Event())
        err = json.loads(raw)["error"]
        assert status == 503 and err["type"] == "server_error", (status, err)
        assert "did not score the prompt" in err["message"]
        assert not router.live.node_up["p0"]  # the PD cluster's first prefill node scores
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


def test_a_decode_node_that_ended_the_request_does_not_fail_the_prefill_nodes():
    """A decode node that ended a request before its KV came (its engine failed, or no KV within
    ``kv_timeout_s``) refuses the transfer, so the prefill fails; the gateway retried the prefill
    on every other prefill node (each failing the same way, each failure counted against a
    healthy node: three in a row take it down) and answered 503 ``prefill_failed``.  The decode
    node's own error is the answer (502), and no prefill node is blamed."""
    fake = quiet_fake({"open": ["ok"], "stream": ["error_at_once"], "prefill": ["slow"]})
    prompt = [0] + [random.Random(4).randrange(256) for _ in range(99)]  # PD-P prefills

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        c = Client(0, prompt, 3, 0, None)
        await run_client(router, c)
        assert c.outcome == ("api_error", 502, "decode_node_failed")
        assert set(router.live.prefill_failures.values()) == {0}
        assert all(router.live.node_up.values())
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["wrong_role", "refused", "fail"])
def test_one_missed_state_poll_of_the_decode_node_fails_no_request(fault):
    """After any failed prefill the gateway polled the decode node once (2 s timeout) and, if
    that poll missed, ended the request with 502 although its decode stream was healthy, marked
    the decode node down for every request and sent no abort.  Now only a failed transfer to the
    decode node (503 ``transfer_failed``) probes it, and one missed poll condemns nobody: the
    prefill is retried, the request completes, the decode node stays up."""
    fake = quiet_fake({"open": ["ok"], "stream": ["ok"], "prefill": [fault, "ok"]})
    prompt = [0] + [random.Random(5).randrange(256) for _ in range(99)]  # PD-P prefills

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        fake.state_misses.update(d0=1, d1=1)  # the next poll of either decode node misses
        c = Client(0, prompt, 4, 0, None)
        await run_client(router, c)
        assert c.outcome == ("ok", expected_tokens(prompt, 4), "length")
        assert router.live.node_up["d0"] and router.live.node_up["d1"]
        # only a failed transfer asked the decode node (and its second poll answered)
        assert sum(fake.state_misses.values()) == (1 if fault == "fail" else 2)
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


def test_a_decode_node_missing_two_polls_after_a_failed_transfer_is_taken_for_dead():
    """The case the probe is for (a decode node killed while a prefill node sends it the KV):
    the transfer failed and the decode node misses two state polls in a row: the request ends
    with 502 ``decode_node_failed``, the decode node is down, no prefill node is blamed."""
    fake = quiet_fake({"open": ["ok"], "stream": ["ok"], "prefill": ["fail"]})
    prompt = [0] + [random.Random(6).randrange(256) for _ in range(99)]

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        fake.state_misses.update(d0=2, d1=2)
        c = Client(0, prompt, 4, 0, None)
        await run_client(router, c)
        assert c.outcome == ("api_error", 502, "decode_node_failed")
        (exp,) = fake.opened
        assert not router.live.node_up[exp.node]
        assert set(router.live.prefill_failures.values()) == {0}
        await router.stop()
        assert exp.closed and router.admission.inflight == 0
        assert router.sched.observer.pending() == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["no_headers", "no_ready_line"])
def test_a_decode_node_that_never_answers_the_open_is_left_in_time(how):
    """A decode node that accepted the connection and then never answered (no headers, or
    headers and no ``ready`` line) held the request forever: the open had no time limit.  Now,
    after ``router.decode_open_timeout_s``, the request is aborted there, the node is down and
    the request goes to the other decode node."""
    script = {"open": ["hang", "ok"], "stream": ["ok"], "prefill": ["ok"]}
    if how == "no_ready_line":
        script.update(open=["ok", "ok"], stream=["no_ready", "ok"])
    fake = quiet_fake(script)
    prompt = [0] + [random.Random(7).randrange(256) for _ in range(99)]

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        c = Client(0, prompt, 4, 0, None)
        await asyncio.wait_for(run_client(router, c), 30)
        assert c.outcome == ("ok", expected_tokens(prompt, 4), "length")
        served = fake.opened[-1].node
        (stuck,) = {"d0", "d1"} - {served}
        assert not router.live.node_up[stuck] and router.live.node_up[served]
        rid = fake.opened[-1].rid
        assert (stuck, rid) in fake.abort_calls  # the request was aborted where it hung
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


@pytest.mark.parametrize("code", ["overloaded", "wrong_role"])
def test_a_decode_node_that_is_full_is_skipped_for_that_request_only(code):
    """A decode open answered 503 ``overloaded`` (or 400 ``wrong_role``) marked that node down
    for every request until the next poll, turning load into 503 ``no_capacity`` for others.
    The node answered: this request tries the other decode node, the node stays up; when every
    decode node answered so, the request alone gets 503 ``no_capacity``."""
    fake = quiet_fake({"open": [code, "ok", code, code], "stream": ["ok"], "prefill": ["ok"]})
    prompt = [0] + [random.Random(8).randrange(256) for _ in range(99)]

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        c = Client(0, prompt, 4, 0, None)
        await run_client(router, c)
        assert c.outcome == ("ok", expected_tokens(prompt, 4), "length")
        assert all(router.live.node_up.values())
        assert all(router.live.available(ep) for ep in router.endpoints.values())
        c2 = Client(1, [1, *prompt[1:]], 4, 0, None)
        await run_client(router, c2)  # both decode nodes answer that they are full
        assert c2.outcome == ("api_error", 503, "no_capacity")
        assert all(router.live.node_up.values())
        await router.stop()
        check_nothing_held(router, fake)

    asyncio.run(scenario())


def test_a_node_switched_outside_the_gateway_gets_its_new_roles_work():
    """The poll read a node's state but not its role: a PD node switched to decode outside the
    gateway (``/admin/role`` by an operator) kept getting prefills (each answered ``wrong_role``)
    and no decodes.  Now the poll adopts the role it reports, in the endpoint and the observer,
    except while the gateway's own switch of that node is under way, and except where the
    scheduler cannot hold it (a PrfaaS cluster has no decode nodes)."""
    fake = quiet_fake({})

    async def scenario() -> None:
        router = make_router(fake)
        await router.poll_once()
        fake.roles.update(p1="decode", f0="decode")
        await router.poll_once()
        assert router.endpoints["p1"].role == "decode"
        pd = router.build_state().clusters["pd"]
        assert pd.roles == [Role.PREFILL, Role.DECODE, Role.DECODE, Role.DECODE]
        assert pd.decode.bs_max[1] > 0 and pd.prefill.busy_until[1] == float("inf")
        assert router.endpoints["f0"].role == "prefill"  # PrfaaS: no decode role to take
        # the gateway's own switch of d1 is under way (drained, executing): the poll leaves the
        # role to that switch, even once the node reports its new one
        router.sched.observer.switch_started(0.0, "pd", 3, Role.PREFILL)
        sw = SwitchInProgress("pd", 3, Role.PREFILL, 0.0, executing=True)
        router.sched.switches[("pd", 3)] = sw
        fake.roles["d1"] = "prefill"
        await router.poll_once()
        assert router.endpoints["d1"].role == "decode"
        assert router.build_state().clusters["pd"].roles[3] is Role.DECODE
        router.sched.switch_failed("pd", 3)  # its answer was lost, but the node did switch
        await router.poll_once()  # no switch under way any more: the reported role counts
        assert router.endpoints["d1"].role == "prefill"
        assert router.build_state().clusters["pd"].roles[3] is Role.PREFILL
        await router.stop()

    asyncio.run(scenario())
