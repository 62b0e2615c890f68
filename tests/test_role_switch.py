"""Live role switches: the gateway drains a PD node the policy wants in the other role and switches
it through the node's ``POST /admin/role`` (no restart); nodes run in process behind ASGI."""

from __future__ import annotations

import asyncio

import httpx

from prfaas import LLMEngine
from prfaas.scheduling.policies import LongTermRebalancing, PrfaaSPolicy
from prfaas.scheduling.types import RequestInfo, Role, RouteDecision
from prfaas.server.config import parse_deploy_config
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint
from prfaas.server.gateway.router import Router
from prfaas.server.protocol import ErrorBody, NodeState

CFG = {
    "model": "tiny",
    "secret": "unit-secret-0123456789",
    "engine": {"max_num_seqs": 2},
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [
                {"name": "p0", "role": "prefill"},
                {"name": "p1", "role": "prefill"},
                {"name": "d0", "role": "decode"},
            ],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0}],
    "router": {"threshold": 256},
}


class _ByHost(httpx.AsyncBaseTransport):
    """One client, several in-process apps: the URL's host picks the app."""

    def __init__(self, apps: dict) -> None:
        self.t = {h: httpx.ASGITransport(app) for h, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.t[request.url.host].handle_async_request(request)


def test_gateway_drains_and_switches_a_pd_node_live(tiny_model):
    from prfaas.server.node.server import NodeServer

    cfg = parse_deploy_config(CFG)
    names = ("p0", "p1", "d0")
    nodes = {
        n: NodeServer(cfg, n, engine=LLMEngine(cfg.node_engine_config(n), model=tiny_model))
        for n in names
    }
    eps = [NodeEndpoint("f0", "prfaas", "prefill", "http://f0")] + [
        NodeEndpoint(n, "pd", cfg.node(n)[1].role, f"http://{n}") for n in names
    ]
    rb = LongTermRebalancing(period_s=1e-3, confirm=1, reverse_after_s=0.0)
    router = Router(cfg, eps, PrfaaSPolicy(256, rebalance=rb))
    router.nodes = NodeClient(
        cfg.secret, httpx.AsyncClient(transport=_ByHost({n: nodes[n].app for n in names}))
    )
    sched = router.sched

    async def scenario() -> None:
        # decode-bound: 8 requests hold d0's KV with 2 slots, the PD-P nodes are idle
        for k in range(8):
            info = RequestInfo(f"r{k}", 100)
            sched.routed(info, RouteDecision("pd", 1, "pd", 2, 100))
            sched.kv_delivered(f"r{k}")
        st = router.build_state()
        assert st.clusters["pd"].decode.waiting == [0, 0, 6]
        router.adapt()  # the policy asks for p0 -> decode; p0 is drained: switched at once
        assert sched.switches and st.clusters["pd"].prefill.busy_until[0] == float("inf")
        await asyncio.wait(set(router._bg), timeout=60)
        assert not sched.switches
        assert st.clusters["pd"].roles == [Role.DECODE, Role.PREFILL, Role.DECODE]
        assert (
            st.clusters["pd"].decode.bs_max == [2, 0, 2] and st.clusters["pd"].decode.load[0] == 0
        )
        assert router.by_cluster["pd"][0].role == "decode" and nodes["p0"].role == "decode"
        assert nodes["p0"].engine.config.role == "decode" and nodes["p0"].kv_port > 0
        s = await router.nodes.state(router.by_cluster["pd"][0])
        assert s.role == "decode" and s.kv_addr is not None
        # the switched node now takes decodes, and the policy places them there
        d = router.route(RequestInfo("new", 50))
        assert (d.prefill_cluster, d.prefill_instance, d.decode_instance) == ("pd", 1, 0)
        # a node with work refuses a switch: 409 busy
        c = router.nodes.http
        r = await c.post("http://p1/admin/role", json={"role": "decode"})
        assert r.status_code == 200 and NodeState.model_validate_json(r.content).role == "decode"
        nodes["d0"].decode.expect["x"] = object()  # an expected request
        r = await c.post("http://d0/admin/role", json={"role": "prefill"})
        assert (
            r.status_code == 409 and ErrorBody.model_validate_json(r.content).error.code == "busy"
        )
        del nodes["d0"].decode.expect["x"]
        r = await c.post("http://d0/admin/role", json={"role": "mixed"})
        assert r.status_code == 400
        await router.nodes.aclose()

    for n in nodes.values():
        n.start()
    try:
        asyncio.run(scenario())
    finally:
        for n in nodes.values():
            n.close()
