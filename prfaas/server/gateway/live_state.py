"""The gateway's live view of the deployment: which nodes are up, their last ``NodeState``, the
router's own accounting (prefill work outstanding, decodes active per node) and the links' readings;
``build_state`` turns it into the ``SystemState`` the policy reads.

Polled every ``router.poll_interval_s`` (``poll``); a node that does not answer is down until it
answers again.  Link capacity of a cut link reads 0.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import httpx

from prfaas.scheduling.types import (
    INF,
    ClusterState,
    DecodePool,
    LinkState,
    PrefillPool,
    Role,
    SystemState,
)
from prfaas.server.config import DeployConfig
from prfaas.server.gateway.metrics import RouterMetrics
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint
from prfaas.server.protocol import NodeState


class LiveState:
    def __init__(
        self,
        cfg: DeployConfig,
        endpoints: list[NodeEndpoint],
        by_cluster: dict[str, list[NodeEndpoint]],
        bs_max: int,
        metrics: RouterMetrics,
    ) -> None:
        self.cfg, self.by_cluster, self.bs_max, self.metrics = cfg, by_cluster, bs_max, metrics
        self.pd = cfg.pd_cluster
        self.endpoints = {e.name: e for e in endpoints}
        self.node_up = {n: True for n in self.endpoints}
        self.node_state: dict[str, NodeState] = {}
        self.prefill_outstanding = {n: 0 for n in self.endpoints}  # tokens sent, not answered
        self.decode_active = {n: 0 for n in self.endpoints}
        self.links = {
            (lk.src, lk.dst): LinkState(lk.src, lk.dst, lk.nominal_gbps, lk.nominal_gbps)
            for lk in cfg.links
        }
        self.recent_uncached: deque[int] = deque(maxlen=2000)

    def mark_down(self, name: str) -> None:
        self.node_up[name] = False

    def available(self, ep: NodeEndpoint) -> bool:
        """Up, and (a prefill node outside the PD cluster) its link to the PD cluster not cut."""
        if not self.node_up[ep.name]:
            return False
        if ep.role == "prefill" and ep.cluster != self.pd:
            st = self.node_state.get(ep.name)
            lk = st.links.get(self.pd) if st is not None else None
            if lk is not None and not lk.up:
                return False
        return True

    def build_state(self, prefix: Mapping[str, Any], now: float | None = None) -> SystemState:
        """The observable state the policy reads (router accounting + the nodes' last readings);
        ``prefix``: each cluster's prefix index (or KV-manager view)."""
        now = time.monotonic() if now is None else now
        rate = self.cfg.router.prefill_tokens_per_s
        clusters: dict[str, ClusterState] = {}
        for c in self.cfg.clusters:
            eps = self.by_cluster[c.name]
            roles = [Role.PREFILL if e.role == "prefill" else Role.DECODE for e in eps]
            pre = None
            if any(r is Role.PREFILL for r in roles):
                bu = [
                    now + self.prefill_outstanding[e.name] / rate
                    if e.role == "prefill" and self.available(e)
                    else INF
                    for e in eps
                ]
                qr = [self._waiting(e.name) for e in eps]
                qt = [self.prefill_outstanding[e.name] for e in eps]
                pre = PrefillPool(bu, qr, qt)
            dec = None
            if c.kind == "pd":
                used = [self.decode_active[e.name] for e in eps]
                bs = [self.bs_max if e.role == "decode" else 0 for e in eps]
                load = [
                    used[i] / bs[i] if bs[i] and self.available(e) else INF
                    for i, e in enumerate(eps)
                ]
                dec = DecodePool(used, [0] * len(eps), bs, load)
            clusters[c.name] = ClusterState(c.name, c.kind, pre, dec, prefix.get(c.name), roles)
        return SystemState(now, clusters, self.links, list(self.recent_uncached))

    def _waiting(self, name: str) -> int:
        st = self.node_state.get(name)
        return st.waiting if st is not None else 0

    async def poll(self, nodes: NodeClient) -> None:
        """Read every node's state once (concurrently); update links and metrics."""
        await asyncio.gather(*(self._poll_one(nodes, ep) for ep in self.endpoints.values()))

    async def _poll_one(self, nodes: NodeClient, ep: NodeEndpoint) -> None:
        m = self.metrics
        try:
            st = await nodes.state(ep)
        except (httpx.HTTPError, ValueError):
            self.node_up[ep.name] = False
            m.node_up.labels(ep.cluster, ep.name).set(0)
            return
        self.node_up[ep.name] = True
        self.node_state[ep.name] = st
        m.node_up.labels(ep.cluster, ep.name).set(1)
        m.queue_depth.labels(ep.cluster, ep.name).set(st.waiting + st.running + st.expecting)
        q = st.cache_query_tokens
        m.cache_hit_rate.labels(ep.cluster, ep.name).set(st.cache_hit_tokens / q if q else 0.0)
        for dst, lk in st.links.items():
            ls = self.links.get((ep.cluster, dst))
            if ls is not None:
                ls.throughput_gbps = lk.gbps
                ls.capacity_gbps = lk.capacity_gbps if lk.up else 0.0
                ls.bytes_in_flight = lk.bytes_in_flight
                m.link_gbps.labels(ep.cluster, dst).set(ls.throughput_gbps)
                m.link_capacity.labels(ep.cluster, dst).set(ls.capacity_gbps)

    def nodes_info(self) -> list[dict[str, Any]]:
        """Per node: its endpoint, up, pid, available, links (``/admin/nodes``, ``/health``)."""
        out = []
        for ep in self.endpoints.values():
            st = self.node_state.get(ep.name)
            out.append(
                {
                    **asdict(ep),
                    "up": self.node_up[ep.name],
                    "pid": st.pid if st is not None else None,
                    "available": self.available(ep),
                    "links": {k: v.model_dump() for k, v in st.links.items()} if st else {},
                }
            )
        return out
