"""The PrfaaS router: builds a ``SystemState`` from live readings, asks the simulator's policy object
where a request goes, and drives it over the nodes' control plane.

Per request: open the decode stream on the chosen PD-D node (it answers with the prefix it already
holds, ``token_start``), ask the chosen prefill node (PrfaaS or PD-P) to prefill and ship the KV from
``token_start`` (only the uncached tail crosses), then relay the decode node's tokens.  A prefill
that fails (node down, link cut, transfer error) marks that node unavailable and the policy decides
again, which falls back to PD-P; the client sees no error.  A decode node that dies ends its own
requests with a clear error.

Prefix index: one ``PrefixIndex`` per cluster over the hash chain of the prompt's
``block_tokens``-token blocks, ``block_tokens`` = the engine's ``checkpoint_interval`` (a prefill can
reuse a prefix only where a KDA state checkpoint exists); a prompt's blocks are inserted in the index
of the cluster that prefilled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from prfaas.cache.hashing import hash_chain
from prfaas.engine import SamplingParams
from prfaas.scheduling.policies import HomogeneousPD, NaiveHeterogeneous, Policy, PrfaaSPolicy
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.types import (
    INF,
    ClusterState,
    DecodePool,
    LinkState,
    PrefillPool,
    RequestInfo,
    Role,
    RouteDecision,
    SystemState,
)
from prfaas.server.config import DeployConfig
from prfaas.server.kv_manager import GlobalKVManager, Replication
from prfaas.server.metrics import RouterMetrics
from prfaas.server.node import params_to_dict
from prfaas.server.openai_protocol import APIError

log = logging.getLogger("prfaas.server.router")
MAX_PREFILL_ATTEMPTS = 3


@dataclass
class NodeEndpoint:
    """Where the router reaches one node."""

    name: str
    cluster: str
    role: str
    url: str


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
    """The decode node of a request failed mid-request."""


class _PrefillFailed(Exception):
    pass


class DecodeStream:
    """The NDJSON stream of one request from its decode node, read by a background task."""

    def __init__(self, router: Router, ep: NodeEndpoint, rid: str) -> None:
        self.router, self.ep, self.rid = router, ep, rid
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.resp: httpx.Response | None = None
        self.task: asyncio.Task | None = None
        self.dead: str | None = None

    async def open(self, prompt: list[int], params: SamplingParams) -> dict[str, Any]:
        body = {
            "request_id": self.rid,
            "prompt_token_ids": prompt,
            "params": params_to_dict(params),
        }
        req = self.router.client.build_request(
            "POST",
            self.ep.url + "/internal/decode",
            json=body,
            timeout=httpx.Timeout(10.0, read=None),
        )
        resp = await self.router.client.send(req, stream=True)
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            await resp.aclose()
            raise _node_error(resp.status_code, text, self.ep)
        self.resp = resp
        lines = resp.aiter_lines()
        first = json.loads(await anext(lines))
        if first.get("event") != "ready":
            raise DecodeFailed(f"decode node {self.ep.name} answered {first}")
        self.task = asyncio.create_task(self._read(lines))
        return first

    async def _read(self, lines: AsyncIterator[str]) -> None:
        try:
            async for line in lines:
                if line.strip():
                    ev = json.loads(line)
                    await self.queue.put(ev)
                    if ev.get("event") == "error" or ev.get("finished"):
                        return
            self.dead = f"decode node {self.ep.name} closed the stream before the request finished"
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            self.dead = f"decode node {self.ep.name} failed: {type(e).__name__}: {e}"
        except asyncio.CancelledError:
            return
        self.router.mark_down(self.ep.name)
        await self.queue.put({"event": "error", "message": self.dead})

    async def next(self) -> dict[str, Any]:
        return await self.queue.get()

    async def close(self, abort: bool) -> None:
        if abort and self.dead is None:
            with contextlib.suppress(httpx.HTTPError):
                await self.router.client.post(
                    self.ep.url + f"/internal/abort/{self.rid}", timeout=5
                )
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.resp is not None:
            with contextlib.suppress(Exception):
                await self.resp.aclose()


def _node_error(status: int, text: str, ep: NodeEndpoint) -> Exception:
    try:
        msg = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = text[:200]
    if status == 400:
        return APIError(400, msg)
    return _PrefillFailed(f"{ep.name}: HTTP {status}: {msg}")


class Generation:
    """One admitted request: its routing and the stream of new tokens (``events()``)."""

    def __init__(
        self, router: Router, route: RouteInfo, stream: DecodeStream, first: list[dict]
    ) -> None:
        self.router, self.route, self.stream = router, route, stream
        self._buffered = first
        self.finished = False
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.num_tokens = 0
        self._closed = False

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Token events ``{"token_ids", "finished", "finish_reason"}``; DecodeFailed on a failure."""
        while not self.finished:
            ev = self._buffered.pop(0) if self._buffered else await self.stream.next()
            if ev.get("event") == "error":
                raise DecodeFailed(ev.get("message", "decode failed"))
            if ev.get("event") != "token" or not (ev["token_ids"] or ev["finished"]):
                continue  # the import's own output carries no token: nothing for the client yet
            if ev["token_ids"] and self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.route.timings["first_token_seen"] = time.time()
                if ev.get("first_token_at") is not None:
                    self.route.timings["d.first_token"] = float(ev["first_token_at"])
            self.num_tokens += len(ev["token_ids"])
            self.finished = bool(ev["finished"])
            yield ev

    async def close(self, outcome: str = "ok") -> None:
        """Always called once the response is over (aborts the decode if it is still running)."""
        if self._closed:
            return
        self._closed = True
        await self.stream.close(abort=not self.finished)
        self.router.release(self, outcome)


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
        self.policy = policy or self._make_policy()
        ecfg = cfg.engine_config("decode")
        self.block_tokens = ecfg.checkpoint_interval if ecfg.enable_prefix_cache else 0
        self.max_model_len = ecfg.max_model_len
        self.bs_max = ecfg.max_num_seqs
        self.prefix = {
            c.name: PrefixIndex(ecfg.num_checkpoints * len(c.nodes), self.block_tokens or 1)
            for c in cfg.clusters
            if self.block_tokens
        }
        self.kvm: GlobalKVManager | None = None
        if cfg.prefix_pool and self.block_tokens:
            self.kvm = GlobalKVManager(
                {c: [e.name for e in eps] for c, eps in self.by_cluster.items()},
                ecfg.block_size,
                ecfg.checkpoint_interval,
            )
            self.prefix = {c.name: self.kvm.view(c.name) for c in cfg.clusters}
        self._hot_prompts: dict[int, list[int]] = {}
        self._bg: set[asyncio.Task] = set()
        self.node_up = {n: True for n in self.endpoints}
        self.node_state: dict[str, dict[str, Any]] = {}
        self.prefill_outstanding = {n: 0 for n in self.endpoints}
        self.decode_active = {n: 0 for n in self.endpoints}
        self.links = {
            (lk.src, lk.dst): LinkState(lk.src, lk.dst, lk.nominal_gbps, lk.nominal_gbps)
            for lk in cfg.links
        }
        self.recent_uncached: deque[int] = deque(maxlen=2000)
        self.inflight = 0
        self.metrics = RouterMetrics()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0), limits=httpx.Limits(max_connections=1000)
        )
        self._ids = itertools.count()
        self._prefix_id = os.urandom(3).hex()
        self._poller: asyncio.Task | None = None
        self.started = time.monotonic()

    def _make_policy(self) -> Policy:
        r = self.cfg.router
        if r.policy == "homogeneous":
            return HomogeneousPD(pd=self.pd)
        if r.policy == "naive":
            return NaiveHeterogeneous(prfaas=self.prfaas, pd=self.pd)
        return PrfaaSPolicy(r.threshold, prfaas=self.prfaas, pd=self.pd, cache_mode=r.cache_mode)

    # ---- live state -------------------------------------------------------------------------
    def _available(self, ep: NodeEndpoint) -> bool:
        if not self.node_up[ep.name]:
            return False
        if ep.role == "prefill" and ep.cluster != self.pd:
            links = self.node_state.get(ep.name, {}).get("links", {})
            if links.get(self.pd, {}).get("up", True) is False:
                return False
        return True

    def build_state(self, now: float | None = None) -> SystemState:
        """The observable state the policy reads (router accounting + the nodes' last readings)."""
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
                    if e.role == "prefill" and self._available(e)
                    else INF
                    for e in eps
                ]
                qr = [int(self.node_state.get(e.name, {}).get("waiting", 0)) for e in eps]
                qt = [self.prefill_outstanding[e.name] for e in eps]
                pre = PrefillPool(bu, qr, qt)
            dec = None
            if c.kind == "pd":
                used = [self.decode_active[e.name] for e in eps]
                bs = [self.bs_max if e.role == "decode" else 0 for e in eps]
                load = [
                    used[i] / bs[i] if bs[i] and self._available(e) else INF
                    for i, e in enumerate(eps)
                ]
                dec = DecodePool(used, [0] * len(eps), bs, load)
            clusters[c.name] = ClusterState(
                c.name, c.kind, pre, dec, self.prefix.get(c.name), roles
            )
        return SystemState(now, clusters, self.links, list(self.recent_uncached))

    def mark_down(self, name: str) -> None:
        self.node_up[name] = False

    async def poll_once(self) -> None:
        async def one(ep: NodeEndpoint) -> None:
            try:
                r = await self.client.get(ep.url + "/state", timeout=2.0)
                r.raise_for_status()
                st = r.json()
            except (httpx.HTTPError, ValueError):
                self.node_up[ep.name] = False
                self.metrics.node_up.labels(ep.cluster, ep.name).set(0)
                return
            self.node_up[ep.name] = True
            self.node_state[ep.name] = st
            m = self.metrics
            m.node_up.labels(ep.cluster, ep.name).set(1)
            m.queue_depth.labels(ep.cluster, ep.name).set(
                st["waiting"] + st["running"] + st.get("expecting", 0)
            )
            q = st.get("cache_query_tokens", 0)
            m.cache_hit_rate.labels(ep.cluster, ep.name).set(
                st.get("cache_hit_tokens", 0) / q if q else 0.0
            )
            for dst, lk in st.get("links", {}).items():
                ls = self.links.get((ep.cluster, dst))
                if ls is not None:
                    ls.throughput_gbps = float(lk.get("gbps", 0.0))
                    ls.capacity_gbps = (
                        float(lk.get("capacity_gbps", 0.0)) if lk.get("up", True) else 0.0
                    )
                    ls.bytes_in_flight = float(lk.get("bytes_in_flight", 0))
                    m.link_gbps.labels(ep.cluster, dst).set(ls.throughput_gbps)
                    m.link_capacity.labels(ep.cluster, dst).set(ls.capacity_gbps)

        await asyncio.gather(*(one(ep) for ep in self.endpoints.values()))
        if self.kvm is not None:
            await self.poll_cache_events()
        if self.policy.threshold is not None:
            self.metrics.threshold.set(self.policy.threshold)

    # ---- global KVCache manager (prefix_pool on) --------------------------------------------
    async def poll_cache_events(self) -> None:
        """Feed every reachable node's cache events to the manager."""

        async def one(ep: NodeEndpoint) -> None:
            since = self.kvm.node_seq.get(ep.name, 0)
            try:
                r = await self.client.get(
                    ep.url + "/internal/cache_events", params={"since": since}, timeout=2.0
                )
                r.raise_for_status()
                self.kvm.apply(ep.name, r.json())
            except (httpx.HTTPError, ValueError) as e:
                log.debug("cache events of %s: %s", ep.name, e)

        await asyncio.gather(*(one(ep) for ep in self.endpoints.values() if self.node_up[ep.name]))

    async def copy_prefix(
        self, prompt: list[int], tokens: int, src: str, dst_ep: NodeEndpoint
    ) -> dict[str, Any]:
        """The paper's cross-cluster cache copy: a node of ``src`` holding the prefix writes it to
        its pool, ``dst_ep`` copies it from there into its own cluster's pool (over the link).
        Returns the copy node's answer ({"bytes": 0} when nothing could be copied)."""
        hs = self.kvm.hashes(prompt)
        nb = tokens // self.kvm.interval
        owner = self.prefix[src].owner(hs, nb)
        body = {"prompt_token_ids": prompt, "tokens": tokens}
        if owner >= 0:
            src_ep = self.by_cluster[src][owner]
            r = await self.client.post(src_ep.url + "/internal/prefix_publish", json=body)
            r.raise_for_status()
            if r.json().get("tokens", 0) < tokens:
                return {"bytes": 0, "tokens": 0}
        r = await self.client.post(
            dst_ep.url + "/internal/prefix_copy",
            json={**body, "source": src},
            timeout=self.cfg.router.prefill_timeout_s,
        )
        r.raise_for_status()
        res = r.json()
        if res.get("bytes"):
            self.kvm.add(dst_ep.cluster, "pool", hs[:nb])
            self.kvm.copies += 1
            self.kvm.copy_bytes += int(res["bytes"])
        return res

    def _start_replications(self, reps: list[Replication]) -> None:
        for rep in reps:
            eps = [
                e for e in self.by_cluster[rep.dst] if e.role == "prefill" and self._available(e)
            ]
            if not eps or not rep.prompt:
                continue

            async def run(rep: Replication = rep, ep: NodeEndpoint = eps[0]) -> None:
                try:
                    await self.copy_prefix(rep.prompt, rep.tokens, rep.src, ep)
                except (httpx.HTTPError, ValueError) as err:
                    log.warning("hot-prefix replication %s->%s failed: %s", rep.src, rep.dst, err)

            t = asyncio.create_task(run())
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
                self.policy.on_tick(time.monotonic(), self.build_state())
            except Exception:  # never let the poller die
                log.exception("poll failed")
            await asyncio.sleep(self.cfg.router.poll_interval_s)

    async def start(self) -> None:
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        await self.client.aclose()

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

    async def generate(self, prompt: list[int], params: SamplingParams) -> Generation:
        """Admit, route, prefill and hand over; returns once the first token is ready. APIError:
        400 bad prompt, 429 overloaded, 503 nothing can serve it."""
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) >= self.max_model_len - 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; at most {self.max_model_len - 2} are accepted",
                param="prompt",
                code="context_length_exceeded",
            )
        if self.inflight >= self.cfg.router.max_inflight:
            self.metrics.requests.labels("rejected_429").inc()
            raise APIError(
                429,
                f"the server is at its limit of {self.cfg.router.max_inflight} requests in flight; retry later",
                "rate_limit_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        rid = f"cmpl-{self._prefix_id}-{next(self._ids)}"
        route = RouteInfo(rid, timings={"arrival": time.time()})
        info = RequestInfo(rid, len(prompt), self.hash_ids(prompt), arrival_s=time.monotonic())
        stream: DecodeStream | None = None
        try:
            decision = self.decide(info)
            pd_nodes = self.by_cluster[self.pd]
            for _ in range(len(pd_nodes)):
                dec_ep = pd_nodes[decision.decode_instance]
                stream = DecodeStream(self, dec_ep, rid)
                try:
                    ready = await stream.open(prompt, params)
                    break
                except (httpx.HTTPError, _PrefillFailed, DecodeFailed) as e:
                    log.warning("decode node %s unusable: %s", dec_ep.name, e)
                    self.mark_down(dec_ep.name)
                    stream = None
                    decision = self.decide(info)
            if stream is None:
                raise APIError(503, "no decode node answered", "server_error", code="no_capacity")
            self.decode_active[dec_ep.name] += 1
            route.decode_node = dec_ep.name
            route.timings["decode_ready"] = time.time()
            first = await self._prefill_and_handover(
                info, prompt, params, decision, stream, ready, route
            )
        except BaseException as e:
            if stream is not None:
                await stream.close(abort=True)
                if route.decode_node:
                    self.decode_active[route.decode_node] -= 1
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            outcome = f"error_{e.status}" if isinstance(e, APIError) else "error"
            self.metrics.requests.labels(outcome).inc()
            raise
        gen = Generation(self, route, stream, first)
        gen.arrival = info.arrival_s
        return gen

    async def _prefill_and_handover(
        self,
        info: RequestInfo,
        prompt: list[int],
        params: SamplingParams,
        decision: RouteDecision,
        stream: DecodeStream,
        ready: dict[str, Any],
        route: RouteInfo,
    ) -> list[dict[str, Any]]:
        token_start = int(ready["token_start"])
        kv_host, kv_port = ready["kv_addr"]
        tried: set[str] = set()
        if decision.copy_from and decision.copy_tokens and self.kvm is not None:
            dst_ep = self.by_cluster[decision.prefill_cluster][decision.prefill_instance]
            try:
                res = await self.copy_prefix(
                    prompt, decision.cached_len, decision.copy_from, dst_ep
                )
                route.copied_from = decision.copy_from if res.get("bytes") else None
                route.copied_tokens = int(res.get("tokens", 0))
                route.copied_bytes = int(res.get("bytes", 0))
            except (httpx.HTTPError, ValueError) as e:  # the prefill recomputes it
                log.warning("prefix copy from %s failed: %s", decision.copy_from, e)
        while True:
            ep = self.by_cluster[decision.prefill_cluster][decision.prefill_instance]
            if ep.name in tried:
                raise APIError(
                    503, f"prefill failed on {sorted(tried)}", "server_error", code="prefill_failed"
                )
            body = {
                "request_id": info.request_id,
                "prompt_token_ids": prompt,
                "params": params_to_dict(params),
                "token_start": token_start,
                "timeout_s": self.cfg.router.prefill_timeout_s,
                "decode": {"cluster": self.pd, "kv_host": kv_host, "kv_port": kv_port},
            }
            work = decision.uncached_len
            self.prefill_outstanding[ep.name] += work
            route.timings["prefill_sent"] = time.time()
            try:
                r = await self.client.post(
                    ep.url + "/internal/prefill",
                    json=body,
                    timeout=self.cfg.router.prefill_timeout_s + 10,
                )
                if r.status_code != 200:
                    raise _node_error(r.status_code, r.text, ep)
                res = r.json()
            except (httpx.HTTPError, _PrefillFailed) as e:
                if stream.dead is not None:
                    raise APIError(
                        502, stream.dead, "server_error", code="decode_node_failed"
                    ) from None
                log.warning("prefill on %s failed (%s); deciding again", ep.name, e)
                tried.add(ep.name)
                self.mark_down(ep.name)
                route.fallback_from.append(ep.name)
                self.metrics.fallbacks.labels(ep.cluster).inc()
                decision = self.decide(info)
                continue
            finally:
                self.prefill_outstanding[ep.name] -= work
            route.timings["prefill_answered"] = time.time()
            ev = await stream.next()
            if ev.get("event") == "kv_error" and token_start > 0:
                token_start = 0  # the decode node lost the prefix meanwhile: send everything
                continue
            if ev.get("event") != "kv":
                msg = ev.get("message", str(ev))
                raise APIError(
                    502,
                    f"decode node {route.decode_node}: {msg}",
                    "server_error",
                    code="decode_node_failed",
                )
            break
        route.timings["kv_seen"] = time.time()
        for k, v in (res.get("timings") or {}).items():
            route.timings[f"p.{k}"] = v
        for k, v in (ev.get("timings") or {}).items():
            route.timings[f"d.{k}"] = v
        # routing bookkeeping
        cluster = decision.prefill_cluster
        if cluster in self.prefix and info.hash_ids:
            self.prefix[cluster].insert(info.hash_ids, info.prompt_len, decision.prefill_instance)
        if self.kvm is not None and info.hash_ids and decision.cached_len:
            nb = decision.cached_len // self.kvm.interval
            self.kvm.note_use(info.hash_ids, nb)
            self._hot_prompts[info.hash_ids[nb - 1]] = prompt[: nb * self.kvm.interval + 1]
            if len(self._hot_prompts) > 4096:
                self._hot_prompts.pop(next(iter(self._hot_prompts)))
            self._start_replications(self.kvm.hot_replications(self._hot_prompts))
        self.recent_uncached.append(max(info.prompt_len - res["cached_tokens"], 0))
        route.prefill_cluster, route.prefill_node = cluster, ep.name
        route.offloaded = cluster != self.pd
        route.cached_tokens = int(res["cached_tokens"])
        route.decode_prefix_tokens = int(res["token_start"])
        route.transfer_bytes = int(res["payload_bytes"])
        route.transfer_wire_bytes = int(res["wire_bytes"])
        route.transfer_ms = 1000 * float(res["transfer_s"])
        route.prefill_ms = 1000 * float(res["prefill_s"])
        route.link = res.get("link")
        route.reason = decision.reason
        m = self.metrics
        m.decisions.labels(cluster, str(route.offloaded).lower()).inc()
        m.transfer_bytes.labels(cluster, self.pd).inc(route.transfer_wire_bytes)
        return []

    def release(self, gen: Generation, outcome: str) -> None:
        self.inflight -= 1
        self.decode_active[gen.route.decode_node] -= 1
        m = self.metrics
        m.inflight.set(self.inflight)
        m.requests.labels(outcome).inc()
        if gen.first_token_at is not None:
            m.ttft.labels(gen.route.prefill_cluster).observe(gen.first_token_at - gen.arrival)
            if gen.num_tokens > 1:
                m.tpot.observe((time.monotonic() - gen.first_token_at) / (gen.num_tokens - 1))

    def nodes_info(self) -> list[dict[str, Any]]:
        out = []
        for ep in self.endpoints.values():
            st = self.node_state.get(ep.name, {})
            out.append(
                {
                    **asdict(ep),
                    "up": self.node_up[ep.name],
                    "pid": st.get("pid"),
                    "available": self._available(ep),
                    "links": st.get("links", {}),
                }
            )
        return out
