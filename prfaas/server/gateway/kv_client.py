"""The gateway's driver of the global KVCache manager (``prefix_pool`` on): feeds it the nodes'
cache events, runs the cross-cluster prefix copies it plans (a node of the source cluster writes
the prefix to its pool, a node of the destination copies it over the link into its own pool) and
the hot-prefix replications, and notes each routed request's prefix use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import httpx

from prfaas.scheduling.types import RequestInfo, RouteDecision
from prfaas.server.gateway.kv_manager import GlobalKVManager, Replication
from prfaas.server.gateway.node_client import NodeClient, NodeEndpoint
from prfaas.server.protocol import PrefixCopy, PrefixCopyResult, PrefixRequest

log = logging.getLogger("prfaas.server.router")
MAX_HOT_PROMPTS = 4096


class KVManagerClient:
    def __init__(
        self,
        kvm: GlobalKVManager,
        nodes: NodeClient,
        by_cluster: dict[str, list[NodeEndpoint]],
        available: Callable[[NodeEndpoint], bool],
        copy_timeout_s: float,
    ) -> None:
        self.kvm, self.nodes, self.by_cluster = kvm, nodes, by_cluster
        self.available, self.copy_timeout_s = available, copy_timeout_s
        self._hot_prompts: dict[int, list[int]] = {}  # boundary hash -> a prompt through it
        self._bg: set[asyncio.Task] = set()

    async def poll_cache_events(self, endpoints: Sequence[NodeEndpoint]) -> None:
        """Feed the cache events of ``endpoints`` (the reachable nodes) to the manager."""

        async def one(ep: NodeEndpoint) -> None:
            try:
                reply = await self.nodes.cache_events(ep, self.kvm.node_seq.get(ep.name, 0))
                self.kvm.apply(ep.name, reply)
            except (httpx.HTTPError, ValueError) as e:
                log.debug("cache events of %s: %s", ep.name, e)

        await asyncio.gather(*(one(ep) for ep in endpoints))

    async def copy_prefix(
        self, prompt: list[int], tokens: int, src: str, dst_ep: NodeEndpoint
    ) -> PrefixCopyResult:
        """The paper's cross-cluster cache copy: a node of ``src`` holding the prefix writes it to
        its pool, ``dst_ep`` copies it from there into its own cluster's pool (over the link).
        Returns the copy node's answer (0 bytes when nothing could be copied)."""
        hs = self.kvm.hashes(prompt)
        nb = tokens // self.kvm.interval
        owner = self.kvm.view(src).owner(hs, nb)
        req = PrefixRequest(prompt_token_ids=prompt, tokens=tokens)
        if owner >= 0:
            res = await self.nodes.prefix_publish(self.by_cluster[src][owner], req)
            if res.tokens < tokens:
                return PrefixCopyResult(bytes=0, tokens=0)
        copy = PrefixCopy(prompt_token_ids=prompt, tokens=tokens, source=src)
        res = await self.nodes.prefix_copy(dst_ep, copy, self.copy_timeout_s)
        if res.bytes:
            self.kvm.note_copy(dst_ep.cluster, hs[:nb], res.bytes)
        return res

    def note_routed(self, info: RequestInfo, decision: RouteDecision, prompt: list[int]) -> None:
        """A request was routed reusing ``decision.cached_len`` tokens: count the prefix's use and
        start the replications of prefixes that became hot."""
        if not info.hash_ids or not decision.cached_len:
            return
        nb = decision.cached_len // self.kvm.interval
        self.kvm.note_use(info.hash_ids, nb)
        self._hot_prompts[info.hash_ids[nb - 1]] = prompt[: nb * self.kvm.interval + 1]
        if len(self._hot_prompts) > MAX_HOT_PROMPTS:
            self._hot_prompts.pop(next(iter(self._hot_prompts)))
        self._start_replications(self.kvm.hot_replications(self._hot_prompts))

    def _start_replications(self, reps: list[Replication]) -> None:
        for rep in reps:
            eps = [e for e in self.by_cluster[rep.dst] if e.role == "prefill" and self.available(e)]
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
