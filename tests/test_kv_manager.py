"""The global KVCache manager: holdings from node events, l_prfaas / l_pd for the router, the
cross-cluster prefix copy (abundant bandwidth) versus recomputation (scarce), hot-prefix replication."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from prfaas.cache.hashing import hash_chain
from prfaas.cache.pool_mooncake import MooncakeMaster
from prfaas.engine import EngineConfig, LLMEngine, SamplingParams
from prfaas.scheduling.types import RequestInfo
from prfaas.server.config import parse_deploy_config
from prfaas.server.gateway.kv_manager import POOL, GlobalKVManager, boundary_hashes
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.router import Router
from prfaas.server.node.prefix_pool import NodeCacheEvents
from prfaas.server.node.server import NodeServer
from prfaas.server.protocol import CacheEventsReply


def reply(d: dict) -> CacheEventsReply:
    """A node's cache-events answer as the gateway parses it."""
    return CacheEventsReply.model_validate(d)


ENGINE = {
    "max_num_seqs": 4,
    "num_blocks": 96,
    "max_model_len": 1024,
    "block_size": 16,
    "checkpoint_interval": 64,
    "num_checkpoints": 16,
}


def toks(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(384) for _ in range(n)]


# ----- manager units ------------------------------------------------------------------------------
def test_boundary_hashes_and_bad_sizes():
    p = toks(0, 200)
    hs = boundary_hashes(p, 16, 64)
    assert len(hs) == 3  # boundaries 64, 128, 192 (at least one token left)
    assert boundary_hashes(p[:193], 16, 64) == hs and len(boundary_hashes(p[:192], 16, 64)) == 2
    with pytest.raises(ValueError, match="multiple"):
        boundary_hashes(p, 16, 40)
    with pytest.raises(ValueError, match="at least one cluster"):
        GlobalKVManager({}, 16, 64)
    with pytest.raises(ValueError, match="hot_uses"):
        GlobalKVManager({"a": ["n"]}, 16, 64, hot_uses=0)


def test_events_views_owner_and_reset():
    m = GlobalKVManager({"prfaas": ["f0"], "pd": ["p0", "d0"]}, 16, 64)
    p = toks(1, 300)
    hs = m.hashes(p)
    assert len(hs) == 4
    m.apply(
        "p0",
        reply({"seq": 1, "events": [{"seq": 1, "op": "add", "where": "node", "hashes": hs[:3]}]}),
    )
    m.apply(
        "d0", reply({"seq": 2, "events": [{"seq": 2, "op": "add", "where": "pool", "hashes": hs}]})
    )
    assert m.cached_tokens("pd", p) == 256 and m.cached_tokens("prfaas", p) == 0
    v = m.view("pd")
    assert v.owner(hs, 3) == 0 and v.owner(hs, 4) == -1  # the 4th boundary only in the pool
    m.apply(
        "d0",
        reply({"seq": 3, "events": [{"seq": 3, "op": "drop", "where": "pool", "hashes": hs[1:]}]}),
    )
    assert m.cached_tokens("pd", p) == 192
    m.apply("p0", reply({"seq": 9, "reset": True, "node": [], "events": []}))
    assert m.cached_tokens("pd", p) == 64 and m.node_seq["p0"] == 9
    with pytest.raises(ValueError, match="unknown node"):
        m.apply("zz", reply({"seq": 1}))
    with pytest.raises(ValueError, match="op"):
        m.apply(
            "p0",
            reply({"seq": 1, "events": [{"seq": 1, "op": "x", "where": "node", "hashes": []}]}),
        )
    with pytest.raises(ValueError, match="seq"):
        m.apply("p0", reply({}))
    with pytest.raises(ValueError, match="unknown cluster"):
        m.view("nope")


def test_node_event_log_from_a_real_cache(tiny_model):
    eng = LLMEngine(
        EngineConfig(model="tiny", **{**ENGINE, "num_checkpoints": 2}), model=tiny_model
    )
    log = NodeCacheEvents(max_events=3)
    p = toks(2, 200)
    eng.add_request(p, SamplingParams(max_tokens=1))
    while eng.has_unfinished():
        eng.step()
    log.sync(eng)
    hs = boundary_hashes(p, 16, 64)
    r = log.since(0)
    assert r.events[0].op == "add" and set(r.events[0].hashes) == set(hs[1:])
    m = GlobalKVManager({"pd": ["p0"]}, 16, 64)
    m.apply("p0", r)
    assert (
        m.view("pd").match_blocks(hs) == 0
    )  # boundary 64 was evicted (2 checkpoints): chain broken
    for i in range(4):  # more events than the log keeps: a reader that fell behind gets a snapshot
        q = toks(10 + i, 100)
        eng.add_request(q, SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        log.sync(eng)
    snap = log.since(0)
    assert snap.reset and set(snap.node) == eng.cache.checkpoint_hashes()


def test_hot_prefix_replication():
    m = GlobalKVManager({"prfaas": ["f0"], "pd": ["p0"]}, 16, 64, hot_uses=3, hot_window_s=10)
    p = toks(3, 200)
    hs = m.hashes(p)
    m.add("pd", "p0", hs)
    for t in (0.0, 1.0):
        m.note_use(hs, 3, now=t)
    assert m.hot_replications({hs[2]: p}, now=2.0) == []
    m.note_use(hs, 3, now=2.0)
    (rep,) = m.hot_replications({hs[2]: p}, now=2.5)
    assert (rep.src, rep.dst, rep.tokens, rep.hashes) == ("pd", "prfaas", 192, hs)
    assert m.hot_replications({hs[2]: p}, now=2.6) == []  # once per prefix and destination
    m2 = GlobalKVManager({"prfaas": ["f0"], "pd": ["p0"]}, 16, 64, hot_uses=2, hot_window_s=1)
    m2.add("pd", POOL, hs)
    m2.note_use(hs, 3, now=0.0)
    m2.note_use(hs, 3, now=5.0)  # the first use fell out of the window: not hot
    assert m2.hot_replications(now=5.0) == []


# ----- cross-cluster copy on real pools and node servers ----------------------------------------
class _Nodes(httpx.AsyncBaseTransport):
    """Route router requests to in-process node apps by host name."""

    def __init__(self, apps: dict) -> None:
        self.t = {h: httpx.ASGITransport(app=a) for h, a in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t = self.t.get(request.url.host)
        if t is None:
            raise httpx.ConnectError(f"no node {request.url.host}", request=request)
        return await t.handle_async_request(request)


def _prefill(node: NodeServer, prompt: list[int], rid: str) -> tuple[int, int]:
    """Prefill on a node's engine (its worker thread); (tokens computed, cached tokens)."""
    eng = node.engine

    def add(e: LLMEngine) -> int:
        before = e.num_prefill_tokens_computed
        e.add_request(prompt, SamplingParams(max_tokens=1), rid)
        return before

    before = node.worker.call(add).result()
    while rid not in eng.prefilled:
        time.sleep(0.01)
    cached = eng.prefilled[rid].num_cached_tokens
    node.worker.call(lambda e: e.release(rid)).result()
    return eng.num_prefill_tokens_computed - before, cached


def test_prefix_copied_when_abundant_recomputed_when_scarce(tiny_model):
    with MooncakeMaster() as mf, MooncakeMaster() as mp:
        cfg = parse_deploy_config(
            {
                "model": "tiny",
                "secret": "x" * 16,
                "prefix_pool": True,
                "prefix_pool_segment_mb": 16,
                "engine": ENGINE,
                "clusters": [
                    {
                        "name": "prfaas",
                        "kind": "prfaas",
                        "pool_master": mf.address.master,
                        "pool_metadata": mf.address.metadata,
                        "nodes": [{"name": "f0", "role": "prefill"}],
                    },
                    {
                        "name": "pd",
                        "kind": "pd",
                        "pool_master": mp.address.master,
                        "pool_metadata": mp.address.metadata,
                        "nodes": [
                            {"name": "p0", "role": "prefill"},
                            {"name": "d0", "role": "decode"},
                        ],
                    },
                ],
                "links": [{"src": "prfaas", "dst": "pd", "gbps": 10.0}],
                "router": {"policy": "prfaas", "threshold": 64, "cache_mode": "auto"},
            }
        )

        def node(name: str) -> NodeServer:
            eng = LLMEngine(cfg.engine_config("prefill"), model=tiny_model)
            return NodeServer(cfg, name, engine=eng)

        f0, p0 = node("f0"), node("p0")
        eps = [
            NodeEndpoint("f0", "prfaas", "prefill", "http://f0"),
            NodeEndpoint("p0", "pd", "prefill", "http://p0"),
            NodeEndpoint("d0", "pd", "decode", "http://d0"),
        ]
        f0.start(), p0.start()
        try:
            P, Q = toks(20, 300), toks(21, 300)
            for i, x in enumerate((P, Q)):  # the prefixes live in the PD cluster only
                assert _prefill(p0, x, f"warm-{i}") == (299, 0)

            async def scenario() -> None:
                router = Router(cfg, eps)
                router.nodes.http = httpx.AsyncClient(
                    transport=_Nodes({"f0": f0.app, "p0": p0.app}),
                    base_url="http://f0",
                    headers=router.nodes.http.headers,  # the deployment's control token
                )
                await router.kv.poll_cache_events(eps)
                R1 = P[:256] + toks(30, 144)
                info = RequestInfo("r1", len(R1), router.hash_ids(R1))
                assert router.kvm.cached_tokens("pd", R1) == 256
                # abundant (idle link): PrfaaS computes, the 256-token prefix is copied from PD
                d = router.decide(info)
                assert (d.prefill_cluster, d.copy_from, d.copy_tokens) == ("prfaas", "pd", 256)
                res = await router.kv.copy_prefix(R1, 256, "pd", eps[0])
                assert res.tokens == 256 and res.bytes > 0
                assert await asyncio.to_thread(_prefill, f0, R1, "r1") == (399 - 256, 256)
                # scarce (busy link): PrfaaS recomputes the prefix that only PD holds
                link = router.live.links[("prfaas", "pd")]
                link.throughput_gbps = 0.9 * link.capacity_gbps
                R2 = Q[:256] + toks(31, 144)
                d2 = router.decide(RequestInfo("r2", len(R2), router.hash_ids(R2)))
                assert (d2.prefill_cluster, d2.copy_from, d2.uncached_len) == ("prfaas", None, 400)
                assert await asyncio.to_thread(_prefill, f0, R2, "r2") == (399, 0)
                await router.nodes.aclose()

            asyncio.run(scenario())
            # KV equality: the PrfaaS node's cache rows of the copied prefix equal PD's
            hs = hash_chain(P[:256], 16)
            for h in hs:
                bf, bp = f0.engine.cache.blocks.lookup(h), p0.engine.cache.blocks.lookup(h)
                assert bf is not None and bp is not None
                for kf, kp in zip(
                    f0.engine.cache.tensors.mla_kv, p0.engine.cache.tensors.mla_kv, strict=True
                ):
                    assert torch.equal(kf[bf], kp[bp])
            assert f0.pool.tier.stats.blocks_fetched == 16 and f0.pool.tier.stats.refused == 0
        finally:
            f0.close(), p0.close()
