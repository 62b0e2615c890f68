"""A node's side of the prefix pool (docs/prefix_pool.md): the second cache tier on its cluster's
Mooncake Store, the log of cache events the gateway's KV manager polls, and the prefix writes and
cross-cluster copies the gateway asks for.

A prefix is named by the engine's block hash chain at a KDA checkpoint boundary (see
``prfaas.server.gateway.kv_manager``).  Every engine access runs in the engine thread
(``EngineWorker.acall``); the pool clients are opened once per cluster, in that thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from prfaas.cache.hashing import hash_chain
from prfaas.cache.store_tier import KVStore, StoreBlockLayout, StoreTier
from prfaas.engine import LLMEngine
from prfaas.server.config import ClusterConfig, DeployConfig, NodeConfig
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.protocol import (
    CacheEvent,
    CacheEventsReply,
    PrefixCopy,
    PrefixCopyResult,
    PrefixPublishResult,
    PrefixRequest,
)

POOL = "pool"  # holder name of a cluster's Mooncake Store


class NodeCacheEvents:
    """Append-only log of one node's cache events (call ``sync`` in the engine thread)."""

    def __init__(self, max_events: int = 4096) -> None:
        self.events: deque[CacheEvent] = deque(maxlen=max_events)
        self.seq = 0
        self._resident: set[int] = set()
        self._pool_seen = 0

    def _add(self, op: str, where: str, hashes: list[int]) -> None:
        if hashes:
            self.seq += 1
            self.events.append(CacheEvent(seq=self.seq, op=op, where=where, hashes=sorted(hashes)))

    def sync(self, engine: LLMEngine, tier: StoreTier | None = None) -> None:
        """Turn the difference since the last call into events: the engine cache's resident
        checkpoints, and the puts of ``tier`` (the node's pool tier, if on)."""
        now = engine.cache.checkpoint_hashes()
        self._add("add", "node", list(now - self._resident))
        self._add("drop", "node", list(self._resident - now))
        self._resident = now
        if tier is not None:
            puts = tier.stats.put_hashes
            self._add("add", POOL, list(set(puts[self._pool_seen :])))
            self._pool_seen = len(puts)

    def since(self, seq: int) -> CacheEventsReply:
        """Events after ``seq``; ``reset`` with a full snapshot when the log no longer has them."""
        first = self.events[0].seq if self.events else self.seq + 1
        if seq + 1 < first:
            return CacheEventsReply(seq=self.seq, reset=True, node=sorted(self._resident))
        return CacheEventsReply(seq=self.seq, events=[e for e in self.events if e.seq > seq])


def copy_prefix(
    src: KVStore, dst: KVStore, layout: StoreBlockLayout, prompt: Sequence[int], tokens: int
) -> int:
    """Copy the pooled blocks of ``prompt[:tokens]`` and the state checkpoint at ``tokens`` from the
    source cluster's pool to ``dst``; returns bytes copied (0 if the source lacks any piece: the
    destination then recomputes; objects are checked again when used)."""
    bs = layout.block_size
    if tokens <= 0 or tokens % bs or tokens > len(prompt):
        raise ValueError(f"tokens {tokens} must be a positive multiple of {bs} within the prompt")
    hs = hash_chain(prompt[:tokens], bs)
    items = []
    for h in hs:
        data = src.get(layout.key(h, "kv"))
        if not data:
            return 0
        items.append((layout.key(h, "kv"), data))
    st = src.get(layout.key(hs[-1], "st"))
    if st:
        items.append((layout.key(hs[-1], "st"), st))
    for k, d in items:
        dst.put(k, d)
    return sum(len(d) for _, d in items)


class PrefixPool:
    """The node's pool clients, its store tier (``prefix_pool`` on) and its cache-event log."""

    def __init__(
        self, cfg: DeployConfig, cluster: ClusterConfig, node: NodeConfig, worker: EngineWorker
    ) -> None:
        self.cfg, self.cluster, self.node, self.worker = cfg, cluster, node, worker
        self.cache_events = NodeCacheEvents()
        self.pools: dict[str, Any] = {}  # cluster -> Mooncake Store client (engine thread only)
        self.tier: StoreTier | None = None
        if cfg.prefix_pool:
            self.tier = StoreTier(self._pool(cluster.name), cfg.prefix_pool_retry_s)
            worker.engine.cache.attach_tier(self.tier)

    def _pool(self, cluster: str) -> Any:
        """The Mooncake Store client of ``cluster``'s pool (opened once)."""
        st = self.pools.get(cluster)
        if st is None:
            from prfaas.cache.pool_mooncake import MooncakeKVStore, PoolAddress

            c = self.cfg.cluster(cluster)
            if not c.pool_master:
                raise ValueError(f"cluster {cluster!r} has no prefix pool address")
            mb = self.cfg.prefix_pool_segment_mb if cluster == self.cluster.name else 16
            st = MooncakeKVStore(
                PoolAddress(c.pool_master, c.pool_metadata), self.node.host, segment_mb=mb
            )
            self.pools[cluster] = st
        return st

    def close(self) -> None:
        for st in self.pools.values():
            st.close(wait=False)

    def stats(self) -> dict[str, int | float | bool] | None:
        """The tier's counters (None with the pool off)."""
        if self.tier is None:
            return None
        d = dataclasses.asdict(self.tier.stats)
        d.pop("put_hashes")
        d["available"] = self.tier.available
        return d

    async def events_since(self, since: int) -> CacheEventsReply:
        def sync(eng: LLMEngine) -> CacheEventsReply:
            self.cache_events.sync(eng, self.tier)
            return self.cache_events.since(since)

        return await self.worker.acall(sync)

    async def publish(self, req: PrefixRequest) -> PrefixPublishResult:
        """Write the resident prefix ``prompt[:tokens]`` (blocks + checkpoint) to this cluster's pool."""
        prompt, tokens = req.prompt_token_ids, req.tokens
        tier = self.tier
        if tier is None:
            raise ValueError("this node has no prefix pool (prefix_pool is off)")

        def publish(eng: LLMEngine) -> PrefixPublishResult:
            m = eng.cache.match(prompt, need_state=True, max_tokens=tokens)
            nb = m.num_tokens // eng.cache.block_size
            hs = hash_chain(prompt[: m.num_tokens], eng.cache.block_size)
            n = tier.publish(hs[:nb], m.blocks, m.checkpoint)
            return PrefixPublishResult(tokens=m.num_tokens, bytes=n)

        return await self.worker.acall(publish)

    async def copy(self, req: PrefixCopy) -> PrefixCopyResult:
        """Copy ``prompt[:tokens]`` from cluster ``source``'s pool into this cluster's pool over the
        (emulated) link between them."""
        prompt, tokens, src = req.prompt_token_ids, req.tokens, req.source
        self.cfg.cluster(src)  # ValueError if unknown
        if self.tier is None or src == self.cluster.name:
            raise ValueError("prefix copy needs prefix_pool on and another source cluster")
        t0 = time.time()

        def copy(eng: LLMEngine) -> int:
            lay = StoreBlockLayout.of(eng.cache)
            return copy_prefix(self._pool(src), self._pool(self.cluster.name), lay, prompt, tokens)

        n = await self.worker.acall(copy)
        lk = self.cfg.link(src, self.cluster.name) or self.cfg.link(self.cluster.name, src)
        if n and lk is not None:  # the bytes crossed the inter-cluster link (emulated)
            await asyncio.sleep(n * 8 / (lk.nominal_gbps * 1e9) + lk.rtt_ms / 1000)
        return PrefixCopyResult(bytes=n, tokens=tokens if n else 0, copy_s=time.time() - t0)
