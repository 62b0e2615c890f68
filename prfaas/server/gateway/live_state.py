"""The gateway's live view of the deployment: which nodes are up, their last ``NodeState``, and the
scheduler's :class:`~prfaas.scheduling.observer.ClusterObserver` (through ``sched``, a
:class:`~prfaas.scheduling.live.LiveScheduler`) fed with what the nodes report: availability (a node
down, or a PrfaaS node's link to the PD cluster cut, takes no work) and the links' counters (bytes
sent, bytes in flight, up; the senders' meters: bytes on the wire and busy seconds, folded over the
source cluster's nodes) for the link capacity estimator.  ``build_state`` is the observer's
``SystemState``: the same object the simulator's policy reads.

Polled every ``router.poll_interval_s`` (``poll``); a node that does not answer is down until it
answers again.  A prefill the node itself reported failed (it answered, with an error) is that
request's failure: the node stays up, unless ``PREFILL_FAILURE_LIMIT`` of its prefills in a row
failed (``prefill_failed``; a success resets the count), then it is down until the next poll and
again after each further failure.  A node that reports another role than the gateway's (switched
outside the gateway) gets that role's work from the poll that reads it on (``_adopt_role``), unless
a switch of it the gateway started is under way (that one sets the role).  ``excluding(names)`` hides nodes from the decisions made inside it
(one request's retry avoids the nodes it tried; nobody else is affected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import httpx

from prfaas.scheduling.link_view import LinkCounterFold
from prfaas.scheduling.live import LiveScheduler
from prfaas.scheduling.types import Role, SystemState
from prfaas.server.config import DeployConfig
from prfaas.server.gateway.metrics import RouterMetrics
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint
from prfaas.server.protocol import NodeState

log = logging.getLogger("prfaas.server.router")
PREFILL_FAILURE_LIMIT = 3  # prefills in a row a node reported failed before it is taken down


class LiveState:
    def __init__(
        self,
        cfg: DeployConfig,
        endpoints: list[NodeEndpoint],
        by_cluster: dict[str, list[NodeEndpoint]],
        sched: LiveScheduler,
        metrics: RouterMetrics,
    ) -> None:
        self.cfg, self.by_cluster, self.sched, self.metrics = cfg, by_cluster, sched, metrics
        self.pd = cfg.pd_cluster
        self.endpoints = {e.name: e for e in endpoints}
        self.index = {e.name: (c, i) for c, eps in by_cluster.items() for i, e in enumerate(eps)}
        self.node_up = {n: True for n in self.endpoints}
        self.node_state: dict[str, NodeState] = {}
        self.links = sched.observer.state.links  # (src, dst) -> LinkState, kept by the observer
        # per link: its source nodes' meters folded into monotone totals (a node may restart)
        self._link_totals: dict[tuple[str, str], LinkCounterFold] = {}
        self.prefill_failures = dict.fromkeys(self.endpoints, 0)  # consecutive, per node
        self._excluded: set[str] = set()
        self._role_warned: set[tuple[str, str]] = set()  # (node, role) logged as not adoptable

    def mark_down(self, name: str) -> None:
        """``name`` failed the request path (no answer, or too many failed prefills): out of
        rotation, and ``prfaas_node_up`` says so, until a poll finds it answering."""
        ep = self.endpoints[name]
        self.node_up[name] = False
        self.metrics.node_up.labels(ep.cluster, ep.name).set(0)
        self._sync(ep)

    def prefill_ok(self, name: str) -> None:
        """A prefill on ``name`` succeeded: its count of consecutive failures starts again."""
        self.prefill_failures[name] = 0

    def prefill_failed(self, name: str) -> bool:
        """A prefill ``name`` answered with an error (the node is alive): counted; True when
        it was the ``PREFILL_FAILURE_LIMIT``-th (or later) in a row, and then ``name`` is down."""
        self.prefill_failures[name] += 1
        if self.prefill_failures[name] < PREFILL_FAILURE_LIMIT:
            return False
        self.mark_down(name)
        return True

    @contextlib.contextmanager
    def excluding(self, names: Iterable[str]) -> Iterator[None]:
        """Within the block (synchronous code only: nothing else runs meanwhile), the nodes
        ``names`` are unavailable to the policy; afterwards they are as before."""
        eps = [self.endpoints[n] for n in names]
        self._excluded.update(e.name for e in eps)
        try:
            yield
        finally:
            self._excluded.clear()
            for ep in eps:
                self._sync(ep)

    async def refresh(self, nodes: NodeClient, ep: NodeEndpoint) -> None:
        """Poll one node now (after it failed a request: a link it reports cut counts at once)."""
        await self._poll_one(nodes, ep)
        self._sync(ep)

    def available(self, ep: NodeEndpoint) -> bool:
        """Up, and (a prefill node outside the PD cluster) its link to the PD cluster not cut."""
        if not self.node_up[ep.name] or ep.name in self._excluded:
            return False
        if ep.role == "prefill" and ep.cluster != self.pd:
            st = self.node_state.get(ep.name)
            lk = st.links.get(self.pd) if st is not None else None
            if lk is not None and not lk.up:
                return False
        return True

    def _sync(self, ep: NodeEndpoint) -> None:
        c, i = self.index[ep.name]
        self.sched.set_available(c, i, self.available(ep))

    def build_state(
        self, prefix: Mapping[str, Any] | None = None, now: float | None = None
    ) -> SystemState:
        """The observable state the policy reads (the observer's; ``prefix`` is the observer's own);
        node availability is brought up to date first."""
        for ep in self.endpoints.values():
            self._sync(ep)
        return self.sched.state(now)

    async def poll(self, nodes: NodeClient) -> None:
        """Read every node's state once (concurrently); feed availability and link counters."""
        await asyncio.gather(*(self._poll_one(nodes, ep) for ep in self.endpoints.values()))
        for ep in self.endpoints.values():
            self._sync(ep)
        m = self.metrics
        for (src, dst), ls in self.links.items():
            sent, in_flight, up, seen = 0.0, 0.0, True, False
            meters: dict[object, tuple[float, float]] = {}
            for ep in self.by_cluster.get(src, []):
                st = self.node_state.get(ep.name)
                lk = st.links.get(dst) if st is not None and self.node_up[ep.name] else None
                if lk is None:
                    continue
                seen = True
                sent += lk.bytes_sent
                in_flight += lk.bytes_in_flight
                up = up and lk.up
                meters[ep.name] = (float(lk.bytes_total), lk.busy_s)
            if seen:  # the senders' meters: bytes on the wire and busy time as measured
                fold = self._link_totals.setdefault((src, dst), LinkCounterFold())
                wire, busy = fold.update(meters)
                self.sched.link_reading(
                    src, dst, sent, in_flight, up, busy_s=busy, delivered_bytes=wire
                )
            m.link_gbps.labels(src, dst).set(ls.throughput_gbps)
            m.link_capacity.labels(src, dst).set(ls.capacity_gbps)

    async def _poll_one(self, nodes: NodeClient, ep: NodeEndpoint) -> None:
        m = self.metrics
        role = ep.role  # a reading begun before a role switch finished says nothing of the new one
        try:
            st = await nodes.state(ep)
        except (httpx.HTTPError, ValueError):
            self.node_up[ep.name] = False
            m.node_up.labels(ep.cluster, ep.name).set(0)
            return
        if st.role != ep.role and ep.role == role:
            self._adopt_role(ep, st.role)
        self.node_up[ep.name] = True
        self.node_state[ep.name] = st
        m.node_up.labels(ep.cluster, ep.name).set(1)
        m.queue_depth.labels(ep.cluster, ep.name).set(st.waiting + st.running + st.expecting)
        q = st.cache_query_tokens
        m.cache_hit_rate.labels(ep.cluster, ep.name).set(st.cache_hit_tokens / q if q else 0.0)

    def _adopt_role(self, ep: NodeEndpoint, role: str) -> None:
        """``ep`` reports ``role``, not the one the gateway gives it work for (switched outside
        the gateway): it gets ``role``'s work from now, unless a switch of it is under way here
        (the gateway's own sets the role once the node confirms) or the scheduler cannot hold it
        there (a PrfaaS cluster has no decode nodes: the node keeps its role, its calls fail)."""
        c, i = self.index[ep.name]
        if self.sched.role_reported(c, i, Role(role)):
            log.warning("%s reports role %s (was %s): adopted", ep.name, role, ep.role)
            ep.role = role
        elif (c, i) not in self.sched.switches and (ep.name, role) not in self._role_warned:
            self._role_warned.add((ep.name, role))  # once, not every poll
            log.warning("%s reports role %s, which %s cannot take", ep.name, role, c)

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
