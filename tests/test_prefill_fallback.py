"""The gateway's retry of a failed prefill (``handover.prefill_and_handover``) against fake nodes
(``httpx.MockTransport``, no process, no model): a prefill node that answers a request's failure
stays in rotation for the others, one that does not answer is taken out, one whose prefills keep
failing is taken out after ``PREFILL_FAILURE_LIMIT`` in a row, and a request that every node failed
ends with 503 ``prefill_failed``."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from prfaas.scheduling.types import RequestInfo
from prfaas.server.config import parse_deploy_config
from prfaas.server.gateway.handover import RouteInfo, prefill_and_handover
from prfaas.server.gateway.live_state import PREFILL_FAILURE_LIMIT
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.gateway.router import Router
from prfaas.server.protocol import (
    ErrorBody,
    ErrorDetail,
    KVEvent,
    LinkReading,
    NodeState,
    PrefillResult,
    ReadyEvent,
    SamplingParamsMsg,
)

CFG = {
    "model": "tiny",
    "secret": "unit-secret-0123456789",
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [{"name": "p0", "role": "prefill"}, {"name": "d0", "role": "decode"}],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0, "rtt_ms": 5}],
    "router": {"threshold": 256, "rebalance": False},
}
CLUSTER = {"f0": "prfaas", "p0": "pd", "d0": "pd"}


class FakeNodes:
    """The nodes' control routes; ``mode[node]``: ``ok``, ``fail`` (answers 503 for the prefill,
    as a node whose transfer of that request failed), ``wrong_role`` (answers 400 ``wrong_role``,
    as a node that switched roles since the last poll) or ``dead`` (refuses connections)."""

    def __init__(self) -> None:
        self.mode = dict.fromkeys(CLUSTER, "ok")
        self.prefills: list[str] = []  # the nodes asked to prefill, in order

    def __call__(self, request: httpx.Request) -> httpx.Response:
        name, path = request.url.host, request.url.path
        if self.mode[name] == "dead":
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/state":
            st = NodeState(
                name=name,
                cluster=CLUSTER[name],
                role="decode" if name == "d0" else "prefill",
                pid=1,
                links={"pd": LinkReading(up=True)} if name == "f0" else {},
            )
            return httpx.Response(200, content=st.to_json())
        if path == "/internal/prefill":
            self.prefills.append(name)
            req = json.loads(request.content)
            if self.mode[name] == "wrong_role":  # switched to decode since the last poll
                err = ErrorDetail(code="wrong_role", message=f"{name} is a decode node")
                return httpx.Response(400, content=ErrorBody(error=err).to_json())
            if self.mode[name] == "fail":
                err = ErrorDetail(code="transfer_failed", message="TransferError: peer reset")
                return httpx.Response(503, content=ErrorBody(error=err).to_json())
            res = PrefillResult(
                request_id=req["request_id"],
                node=name,
                cluster=CLUSTER[name],
                prompt_tokens=len(req["prompt_token_ids"]),
                cached_tokens=0,
                token_start=0,
                payload_bytes=1000,
                wire_bytes=1100,
                prefill_s=0.01,
                transfer_s=0.01,
                link=None,
                timings={},
            )
            return httpx.Response(200, content=res.to_json())
        return httpx.Response(200, content=b"{}")


class FakeStream:
    """The decode node's event stream of one request: it imports whatever arrives."""

    def __init__(self, ep: NodeEndpoint) -> None:
        self.ep, self.dead, self.ended = ep, None, None

    async def next(self) -> KVEvent:
        return KVEvent(
            token_start=0, payload_bytes=1000, wire_bytes=1100, receive_s=0.01, timings={}
        )


@pytest.fixture
def setup():
    cfg = parse_deploy_config(CFG)
    eps = [
        NodeEndpoint(n, c, "decode" if n == "d0" else "prefill", f"http://{n}")
        for n, c in CLUSTER.items()
    ]
    router = Router(cfg, eps)
    fake = FakeNodes()
    router.nodes = NodeClient(cfg.secret, httpx.AsyncClient(transport=httpx.MockTransport(fake)))
    return router, fake


def node_up_gauge(router: Router, name: str) -> float | None:
    ep = router.endpoints[name]
    labels = {"cluster": ep.cluster, "node": name}
    return router.metrics.registry.get_sample_value("prfaas_node_up", labels)


def long_prompt(k: int) -> list[int]:
    """Request ``k``'s prompt: over the threshold (PrfaaS: f0), no prefix shared with others."""
    rng = random.Random(k)
    return [rng.randrange(256) for _ in range(300)]


async def _request(router: Router, k: int) -> RouteInfo:
    """One request's prefill and hand-over (as ``Router.generate`` drives it)."""
    prompt = long_prompt(k)
    info = RequestInfo(f"r{k}", len(prompt), router.hash_ids(prompt))
    d = router.route(info)
    assert (d.prefill_cluster, d.decode_cluster) == ("prfaas", "pd")  # f0 is in rotation
    d0 = router.endpoints["d0"]
    ready = ReadyEvent(node="d0", token_start=0, kv_addr=("127.0.0.1", 1))
    route = RouteInfo(f"r{k}")
    await prefill_and_handover(
        router,
        info,
        prompt,
        SamplingParamsMsg(),
        d,
        FakeStream(d0),
        ready,
        route,
        lambda i: router.route(i, d.decode_instance),
    )
    router.sched.decode_done(info.request_id)
    return route


def test_a_request_failure_keeps_the_node_in_rotation(setup):
    router, fake = setup

    async def scenario() -> None:
        await router.poll_once()
        fake.mode["f0"] = "fail"
        for k in range(PREFILL_FAILURE_LIMIT - 1):
            route = await _request(router, k)  # retried on PD-P, f0 stays up for the others
            assert route.prefill_node == "p0" and route.fallback_from == ["f0"]
            assert router.live.node_up["f0"] and router.live.available(router.endpoints["f0"])
        assert fake.prefills == ["f0", "p0"] * (PREFILL_FAILURE_LIMIT - 1)
        # one success resets the count: the node is healthy, its failures were the requests'
        fake.mode["f0"] = "ok"
        assert (await _request(router, 10)).prefill_node == "f0"
        assert router.live.prefill_failures["f0"] == 0
        # failing every prefill: down after PREFILL_FAILURE_LIMIT in a row (until it is polled)
        fake.mode["f0"] = "fail"
        for k in range(PREFILL_FAILURE_LIMIT):
            assert (await _request(router, 20 + k)).prefill_node == "p0"
        assert not router.live.node_up["f0"]
        await router.poll_once()
        assert router.live.node_up["f0"]
        await router.nodes.aclose()

    asyncio.run(scenario())


def test_a_node_that_does_not_answer_is_taken_down(setup):
    router, fake = setup

    async def scenario() -> None:
        await router.poll_once()
        fake.mode["f0"] = "dead"
        route = await _request(router, 0)
        assert route.prefill_node == "p0" and route.fallback_from == ["f0"]
        assert not router.live.node_up["f0"]
        assert node_up_gauge(router, "f0") == 0  # dashboards see it down at once
        assert router.decide(RequestInfo("x", 300)).prefill_cluster == "pd"
        # every prefill node fails this request: a clear 503, the nodes that answered stay up
        fake.mode.update(f0="fail", p0="fail")
        await router.poll_once()  # f0 answers again
        with pytest.raises(APIError) as e:
            await _request(router, 1)
        assert e.value.status == 503 and e.value.code == "prefill_failed"
        assert "f0" in e.value.message and "p0" in e.value.message
        assert router.live.node_up["f0"] and router.live.node_up["p0"]
        assert node_up_gauge(router, "f0") == 1
        await router.nodes.aclose()

    asyncio.run(scenario())


def test_a_node_that_switched_roles_is_tried_elsewhere(setup):
    """A 400 ``wrong_role`` is the node's state, not the request's fault: the request goes to
    another prefill node (no 400 to the client) and the node stays up."""
    router, fake = setup

    async def scenario() -> None:
        await router.poll_once()
        fake.mode["f0"] = "wrong_role"
        route = await _request(router, 0)
        assert route.prefill_node == "p0" and route.fallback_from == ["f0"]
        assert fake.prefills == ["f0", "p0"]
        assert router.live.node_up["f0"]
        await router.nodes.aclose()

    asyncio.run(scenario())


def test_a_bad_request_answer_is_the_clients_400():
    """Any other 400 from a node is the request's fault: the client gets it as is."""
    from prfaas.server.gateway.node_client import PrefillFailed, node_error

    ep = NodeEndpoint("f0", "prfaas", "prefill", "http://f0")
    bad = ErrorBody(error=ErrorDetail(code="bad_request", message="prompt too long")).to_json()
    role = ErrorBody(error=ErrorDetail(code="wrong_role", message="f0 is a decode node")).to_json()
    e = node_error(400, bad, ep)
    assert isinstance(e, APIError) and e.status == 400 and "prompt too long" in e.message
    assert isinstance(node_error(400, role, ep), PrefillFailed)
    assert isinstance(node_error(400, b"<html>", ep), APIError)
    assert isinstance(node_error(503, bad, ep), PrefillFailed)
