"""The PrfaaS router: builds a ``SystemState`` from live readings (``LiveState``), asks the
simulator's policy object where a request goes (``Policy.decide``, pure), and drives it over the
nodes' control plane (``handover``).

Per request: admission (``Admission``), the decision, the decode stream on the chosen PD-D node
(another one if it does not answer in time, or answers that it is full), then
``prefill_and_handover``; the API reads the tokens from the returned ``Generation``.  A prefill that fails (node down, link cut, transfer error) is retried
where the policy decides next among the nodes not tried yet, which falls back to PD-P; the client
sees no error.  A node that did not answer is marked unavailable; one that reported the failure
stays available to other requests unless its prefills keep failing (``handover``).
A decode node that dies ends its own requests with a clear error.

Prefix index: one ``PrefixIndex`` per cluster over the hash chain of the prompt's
``block_tokens``-token blocks, ``block_tokens`` = the engine's ``checkpoint_interval`` (a prefill can
reuse a prefix only where a KDA state checkpoint exists); a prompt's blocks are inserted in the index
of the cluster that prefilled it.  With ``prefix_pool`` on, the global KV manager's per-cluster views
take the indexes' place (``KVManagerClient`` feeds it).

Imports no torch: the gateway process runs without the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import httpx

from prfaas.cache.hashing import hash_chain
from prfaas.scheduling.policies import Policy
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.types import RequestInfo, RouteDecision, SystemState
from prfaas.server.config import DeployConfig
from prfaas.server.gateway.admission import Admission
from prfaas.server.gateway.handover import (
    DecodeFailed,
    DecodeStream,
    Generation,
    RouteInfo,
    prefill_and_handover,
)
from prfaas.server.gateway.kv_client import KVManagerClient
from prfaas.server.gateway.kv_manager import GlobalKVManager
from prfaas.server.gateway.live_state import LiveState
from prfaas.server.gateway.metrics import RouterMetrics
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint, PrefillFailed
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.gateway.scheduler import build_scheduler
from prfaas.server.protocol import ReadyEvent, SamplingParamsMsg

log = logging.getLogger("prfaas.server.router")
# a decode node's answers to an open that say "not this request, not now" (it is full, or it
# switched roles since the last poll): the request tries another node, nobody else is affected
BUSY_CODES = ("overloaded", "wrong_role")


class Router:
    def __init__(
        self, cfg: DeployConfig, endpoints: list[NodeEndpoint], policy: Policy | None = None
    ) -> None:
        self.cfg = cfg
        self.endpoints = {e.name: e for e in endpoints}
        self.by_cluster: dict[str, list[NodeEndpoint]] = {}
        for c in cfg.clusters:
            eps = [e for e in endpoints if e.cluster == c.name]
            if len(eps) != len(c.nodes):
                raise ValueError(
                    f"cluster {c.name!r}: {len(c.nodes)} nodes in the config, {len(eps)} endpoints"
                )
            self.by_cluster[c.name] = eps
        self.pd = cfg.pd_cluster
        self.prfaas = cfg.prfaas_cluster
        lim = cfg.engine_limits()
        self.block_tokens = lim.checkpoint_interval if lim.enable_prefix_cache else 0
        self.metrics = RouterMetrics(cfg.model)
        self.nodes = NodeClient(cfg.secret)
        self.admission = Admission(lim.max_model_len, cfg.router.max_inflight, self.metrics)
        self.prefix: dict[str, Any] = {
            c.name: PrefixIndex(lim.num_checkpoints * len(c.nodes), self.block_tokens or 1)
            for c in cfg.clusters
            if self.block_tokens
        }
        self.kvm: GlobalKVManager | None = None
        self.kv: KVManagerClient | None = None
        if cfg.prefix_pool and self.block_tokens:
            self.kvm = GlobalKVManager(
                {c: [e.name for e in eps] for c, eps in self.by_cluster.items()},
                lim.block_size,
                lim.checkpoint_interval,
            )
            self.prefix = {c.name: self.kvm.view(c.name) for c in cfg.clusters}
        # one observer of the cluster, fed by the request path and the poller (scheduling.live)
        self.sched = build_scheduler(cfg, self.by_cluster, self.prefix, policy)
        self.policy = self.sched.policy
        self.live = LiveState(cfg, endpoints, self.by_cluster, self.sched, self.metrics)
        if self.kvm is not None:
            self.kv = KVManagerClient(
                self.kvm,
                self.nodes,
                self.by_cluster,
                self.live.available,
                cfg.router.prefill_timeout_s,
            )
        self._poller: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()  # clean-up work that outlives its request
        self.started = time.monotonic()

    # ---- live state -------------------------------------------------------------------------
    def build_state(self, now: float | None = None) -> SystemState:
        """The observable state the policy reads: the observer's (the simulator's policy reads the
        same one)."""
        return self.live.build_state(now=now)

    def mark_down(self, name: str) -> None:
        self.live.mark_down(name)

    async def poll_once(self) -> None:
        await self.live.poll(self.nodes)
        if self.kv is not None:
            up = [ep for ep in self.endpoints.values() if self.live.node_up[ep.name]]
            await self.kv.poll_cache_events(up)
        if self.policy.threshold is not None:
            self.metrics.threshold.set(self.policy.threshold)

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
                self.adapt()
            except Exception:  # never let the poller die
                log.exception("poll failed")
            await asyncio.sleep(self.cfg.router.poll_interval_s)

    def adapt(self) -> None:
        """The policy's periodic adaptation (threshold search, role rebalancing); drained nodes
        whose switch it started are switched in the background."""
        for a in self.sched.tick():
            log.warning("role switch: %s#%d -> %s (%s)", a.cluster, a.instance, a.to_role, a.reason)
        for sw in self.sched.ready_switches():
            sw.executing = True
            self.spawn(self._switch_role(sw.cluster, sw.instance, sw.to_role.value))

    async def _switch_role(self, cluster: str, instance: int, role: str) -> None:
        ep = self.by_cluster[cluster][instance]
        try:
            st = await self.nodes.switch_role(ep, role)
        except (httpx.HTTPError, PrefillFailed, ValueError) as e:
            log.warning("role switch of %s to %s failed: %s", ep.name, role, e)
            self.sched.switch_failed(cluster, instance)
            return
        ep.role = st.role
        self.live.node_state[ep.name] = st
        self.sched.switch_done(cluster, instance)
        self.metrics.role_switches.labels(cluster, role).inc()
        log.warning("role switch: %s now %s", ep.name, role)

    async def start(self) -> None:
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        if self._bg:  # aborts and stream closes still under way (bounded: their own timeouts)
            await asyncio.wait(set(self._bg), timeout=10)
        await self.nodes.aclose()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background (clean-up that must not be cancelled with its request)."""
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # ---- routing ----------------------------------------------------------------------------
    def hash_ids(self, prompt: list[int]) -> list[int]:
        if self.kvm is not None:
            return self.kvm.hashes(prompt)
        bt = self.block_tokens
        if not bt:
            return []
        return hash_chain(prompt[: ((len(prompt) - 1) // bt) * bt], bt)

    def decide(self, info: RequestInfo) -> RouteDecision:
        try:
            return self.policy.decide(info, self.build_state())
        except ValueError as e:
            raise APIError(
                503, f"no node can serve the request now: {e}", "server_error", code="no_capacity"
            ) from None

    def route(self, info: RequestInfo, decode_instance: int | None = None) -> RouteDecision:
        """Decide and tell the observer (a request routed before is forgotten first);
        ``decode_instance``: the decode node is already chosen (its stream is open)."""
        self.sched.decode_done(info.request_id)
        d = self.decide(info)
        if decode_instance is not None:
            d = replace(d, decode_cluster=self.pd, decode_instance=decode_instance)
        self.sched.routed(info, d)
        return d

    async def generate(self, prompt: list[int], params: SamplingParamsMsg) -> Generation:
        """Admit, route, prefill and hand over; returns once the decode node holds the KV. APIError:
        400 bad prompt, 429 overloaded, 503 nothing can serve it, 502 the decode node failed."""
        self.admission.admit(prompt)
        rid = new_request_id()
        route = RouteInfo(rid, timings={"arrival": time.time()})
        info = RequestInfo(rid, len(prompt), self.hash_ids(prompt), arrival_s=time.monotonic())
        stream: DecodeStream | None = None
        try:
            decision = self.route(info)
            stream, ready, decision = await self._open_decode(info, prompt, params, decision)
            route.decode_node = stream.ep.name
            route.timings["decode_ready"] = time.time()
            d_inst = decision.decode_instance
            await prefill_and_handover(
                self,
                info,
                prompt,
                params,
                decision,
                stream,
                ready,
                route,
                lambda i: self.route(i, d_inst),
            )
        except BaseException as e:  # cancelled too (the client went away): nothing awaited here
            if stream is not None:
                stream.close_soon(abort=True)
            self.sched.decode_done(rid)
            self.admission.release(_outcome(e))
            raise
        return Generation(route, stream, self.release, info.arrival_s, len(prompt))

    async def _open_decode(
        self,
        info: RequestInfo,
        prompt: list[int],
        params: SamplingParamsMsg,
        decision: RouteDecision,
    ) -> tuple[DecodeStream, ReadyEvent, RouteDecision]:
        """The decode stream on the decided PD-D node; one that does not answer (refused, or no
        ``ready`` within ``router.decode_open_timeout_s``) is marked down, one that answered
        ``overloaded`` or ``wrong_role`` is only left out of this request's next decisions (it
        stays up for the others), and the policy decides again (as many tries as PD nodes;
        503 ``no_capacity`` when none is left)."""
        # the decode node gives up on the KV once every prefill node could have been tried
        # (each try is bounded by prefill_timeout_s + 10 s on the gateway): a KV lost with a
        # dead prefill node then ends the request with an error instead of holding it
        n_prefill = sum(1 for eps in self.by_cluster.values() for e in eps if e.role == "prefill")
        kv_timeout = (self.cfg.router.prefill_timeout_s + 10.0) * max(1, n_prefill) + 10.0
        limit = self.cfg.router.decode_open_timeout_s  # for its headers and its ready line
        skipped: set[str] = set()  # nodes that answered they cannot take this request now
        for _ in range(len(self.by_cluster[self.pd])):
            ep = self.by_cluster[self.pd][decision.decode_instance]
            stream = DecodeStream(self.nodes, ep, info.request_id, self.mark_down, self.spawn)
            try:
                ready = await asyncio.wait_for(stream.open(prompt, params, kv_timeout), limit)
                return stream, ready, decision
            except asyncio.CancelledError:
                stream.close_soon(abort=True)
                raise
            except TimeoutError:  # no answer in time: it may hold the request, abort it there
                stream.close_soon(abort=True)
                log.warning("decode node %s did not answer the open within %.1f s", ep.name, limit)
                self.mark_down(ep.name)
            except (httpx.HTTPError, PrefillFailed, DecodeFailed) as e:
                stream.close_soon(abort=False)
                if isinstance(e, PrefillFailed) and e.code in BUSY_CODES:
                    log.info("decode node %s cannot take %s now: %s", ep.name, info.request_id, e)
                    skipped.add(ep.name)  # it answered: up for the others
                else:
                    log.warning("decode node %s unusable: %s", ep.name, e)
                    self.mark_down(ep.name)
            with self.live.excluding(skipped):
                decision = self.route(info)
        raise APIError(503, "no decode node answered", "server_error", code="no_capacity")

    def release(self, gen: Generation, outcome: str) -> None:
        self.admission.release(outcome)
        out_len = gen.num_tokens if gen.finished else None
        self.sched.decode_done(gen.route.request_id, output_len=out_len)
        self.metrics.observe_request(gen, outcome)

    def nodes_info(self) -> list[dict[str, Any]]:
        return self.live.nodes_info()


def new_request_id() -> str:
    """A request id nobody can guess (96 random bits): ids name requests in abort calls."""
    return f"cmpl-{secrets.token_hex(12)}"


def _outcome(e: BaseException) -> str:
    """The ``prfaas_requests_total`` outcome of a request that ended with ``e`` before its answer."""
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    return f"error_{e.status}" if isinstance(e, APIError) else "error"
