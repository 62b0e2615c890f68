"""The global KVCache manager (gateway side): which reusable prefixes each cluster holds (node caches
and the cluster's Mooncake Store pool), from the nodes' cache events; queried by the router for
``l_prfaas`` and ``l_pd``; plans the cross-cluster prefix copy and hot-prefix replication.  The
nodes' side (event log, the copy itself) is ``prfaas.server.node.prefix_pool``.

A prefix is named by the engine's block hash chain at a KDA checkpoint boundary (every
``checkpoint_interval`` tokens): the hash of block ``k * interval / block_size - 1`` covers tokens
``[0, k * interval)``.  Node events say which boundaries a node holds a state checkpoint for (its MLA
blocks may have gone to the pool meanwhile; the node re-checks at prefill time, so the view is a
hint: a stale entry costs recomputation, never wrong output).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from prfaas.cache.hashing import hash_chain
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.server.protocol import CacheEventsReply

POOL = "pool"  # holder name of a cluster's Mooncake Store (as in the nodes' cache events)


def boundary_hashes(prompt: Sequence[int], block_size: int, interval: int) -> list[int]:
    """Chain hashes at the checkpoint boundaries a prefill may reuse (at least one token left)."""
    if block_size < 1 or interval < block_size or interval % block_size:
        raise ValueError("checkpoint interval must be a positive multiple of block_size")
    n = (len(prompt) - 1) // interval * interval
    step = interval // block_size
    return hash_chain(prompt[:n], block_size)[step - 1 :: step]


# ----- router side ------------------------------------------------------------------------------
@dataclass
class Replication:
    """Copy a prefix (``tokens`` long, named by its boundary hashes) from ``src`` to ``dst``."""

    src: str
    dst: str
    hashes: list[int]
    tokens: int
    prompt: list[int] = field(default_factory=list)


class ClusterPrefixView:
    """One cluster's holdings as the policies read a prefix index (``match_tokens``, ``owner``)."""

    def __init__(self, manager: GlobalKVManager, cluster: str) -> None:
        self.manager, self.cluster = manager, cluster
        self.block_tokens = manager.interval

    def __len__(self) -> int:
        return len(self.manager.held[self.cluster])

    def match_blocks(self, hash_ids: Sequence[int]) -> int:
        held = self.manager.held[self.cluster]
        n = 0
        for h in hash_ids:
            if not held.get(h):
                break
            n += 1
        return n

    # the prefix index's rule (whole blocks, at least one token left) over this view's match_blocks
    match_tokens = PrefixIndex.match_tokens

    def owner(self, hash_ids: Sequence[int], n_blocks: int) -> int:
        """Index (in the cluster) of a node holding the prefix in its own cache; -1 if none."""
        if n_blocks <= 0:
            return -1
        holders = self.manager.held[self.cluster].get(hash_ids[n_blocks - 1], set())
        nodes = self.manager.nodes[self.cluster]
        for i, name in enumerate(nodes):
            if name in holders:
                return i
        return -1

    def lookup(self, hash_ids: Sequence[int], prompt_len: int) -> int:
        return self.match_tokens(hash_ids, prompt_len)

    def insert(self, hash_ids: Sequence[int], prompt_len: int, instance: int = -1) -> int:
        """The router's own note after a prefill (events confirm it later)."""
        nodes = self.manager.nodes[self.cluster]
        name = nodes[instance] if 0 <= instance < len(nodes) else POOL
        n = min(len(hash_ids), prompt_len // self.block_tokens)
        self.manager.add(self.cluster, name, list(hash_ids[:n]))
        return 0


class GlobalKVManager:
    """Which cluster holds which prefix; cross-cluster copy and hot-prefix replication plans."""

    def __init__(
        self,
        nodes: dict[str, list[str]],
        block_size: int,
        interval: int,
        hot_uses: int = 8,
        hot_window_s: float = 60.0,
    ) -> None:
        if not nodes:
            raise ValueError("the manager needs at least one cluster")
        if hot_uses < 1 or hot_window_s <= 0:
            raise ValueError("hot_uses must be >= 1 and hot_window_s > 0")
        boundary_hashes([], block_size, interval)  # validates the sizes
        self.nodes = {c: list(ns) for c, ns in nodes.items()}
        self.block_size, self.interval = block_size, interval
        self.held: dict[str, dict[int, set[str]]] = {c: {} for c in nodes}
        self.node_seq: dict[str, int] = {}
        self.hot_uses, self.hot_window_s = hot_uses, hot_window_s
        self._uses: OrderedDict[int, deque[float]] = OrderedDict()
        self._replicated: set[tuple[int, str]] = set()
        self.copies = 0
        self.copy_bytes = 0

    def cluster_of(self, node: str) -> str:
        for c, ns in self.nodes.items():
            if node in ns:
                return c
        raise ValueError(f"unknown node {node!r}")

    def view(self, cluster: str) -> ClusterPrefixView:
        if cluster not in self.held:
            raise ValueError(f"unknown cluster {cluster!r}")
        return ClusterPrefixView(self, cluster)

    def hashes(self, prompt: Sequence[int]) -> list[int]:
        return boundary_hashes(prompt, self.block_size, self.interval)

    # ---- holdings ---------------------------------------------------------------------------
    def add(self, cluster: str, holder: str, hashes: Sequence[int]) -> None:
        held = self.held[cluster]
        for h in hashes:
            held.setdefault(h, set()).add(holder)

    def drop(self, cluster: str, holder: str, hashes: Sequence[int]) -> None:
        held = self.held[cluster]
        for h in hashes:
            s = held.get(h)
            if s is not None:
                s.discard(holder)
                if not s:
                    del held[h]

    def apply(self, node: str, reply: CacheEventsReply) -> None:
        """Apply a node's ``/internal/cache_events`` reply."""
        cluster = self.cluster_of(node)
        if reply.reset:
            for s in self.held[cluster].values():
                s.discard(node)
            self.held[cluster] = {h: s for h, s in self.held[cluster].items() if s}
            self.add(cluster, node, reply.node)
        for ev in reply.events:
            holder = node if ev.where == "node" else POOL
            (self.add if ev.op == "add" else self.drop)(cluster, holder, ev.hashes)
        self.node_seq[node] = reply.seq

    def note_copy(self, cluster: str, hashes: Sequence[int], nbytes: int) -> None:
        """A prefix copy into ``cluster``'s pool succeeded (``nbytes`` copied)."""
        self.add(cluster, POOL, hashes)
        self.copies += 1
        self.copy_bytes += nbytes

    def cached_tokens(self, cluster: str, prompt: Sequence[int]) -> int:
        hs = self.hashes(prompt)
        return self.view(cluster).match_tokens(hs, len(prompt))

    # ---- hot prefixes -----------------------------------------------------------------------
    def note_use(self, hash_ids: Sequence[int], n_blocks: int, now: float | None = None) -> None:
        """A routed request reused ``n_blocks`` boundaries of ``hash_ids``."""
        if n_blocks <= 0:
            return
        now = time.monotonic() if now is None else now
        h = hash_ids[n_blocks - 1]
        q = self._uses.setdefault(h, deque())
        self._uses.move_to_end(h)
        q.append(now)
        while len(self._uses) > 10_000:
            self._uses.popitem(last=False)

    def hot_replications(
        self, prompts: dict[int, list[int]] | None = None, now: float | None = None
    ) -> list[Replication]:
        """Prefixes used ``hot_uses`` times within ``hot_window_s`` that only one cluster holds:
        copy them to the others (each prefix/destination once)."""
        now = time.monotonic() if now is None else now
        out = []
        for h, q in list(self._uses.items()):
            while q and q[0] < now - self.hot_window_s:
                q.popleft()
            if len(q) < self.hot_uses:
                continue
            holders = [c for c in self.held if self.held[c].get(h)]
            if len(holders) != 1:
                continue
            for dst in self.held:
                if dst == holders[0] or (h, dst) in self._replicated:
                    continue
                prompt = (prompts or {}).get(h, [])
                hs = self.hashes(prompt) if prompt else [h]
                n = hs.index(h) + 1 if h in hs else 1
                self._replicated.add((h, dst))
                out.append(Replication(holders[0], dst, hs[:n], n * self.interval, prompt))
        return out
