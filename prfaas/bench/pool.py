"""A bounded HTTP connection pool split over several small httpx clients.

httpx/httpcore scans every connection of a pool each time a request starts or ends (with a socket
poll per idle connection), so one pool of hundreds of connections costs O(connections) per request
and the client falls behind at a few hundred req/s. Shards of ``shard_size`` connections keep that
scan short; each request goes to the shard with the fewest requests in flight. The total stays
bounded by ``max_connections``.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

SHARD_SIZE = 4


class ShardedClient:
    """``max_connections`` connections over ``ceil(max_connections / shard_size)`` httpx clients."""

    def __init__(
        self, max_connections: int, timeout: httpx.Timeout, shard_size: int = SHARD_SIZE
    ) -> None:
        if max_connections < 1 or shard_size < 1:
            raise ValueError("max_connections and shard_size must be >= 1")
        n = math.ceil(max_connections / shard_size)
        sizes = [max_connections // n + (1 if i < max_connections % n else 0) for i in range(n)]
        ssl_ctx = ssl.create_default_context()  # one for all shards (each costs ~15 ms)
        self.clients = [
            httpx.AsyncClient(
                limits=httpx.Limits(max_connections=s, max_keepalive_connections=s),
                timeout=timeout,
                verify=ssl_ctx,
            )
            for s in sizes
        ]
        self.in_flight = [0] * n

    @property
    def first(self) -> httpx.AsyncClient:
        return self.clients[0]

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        """The least busy shard, counted busy while the context is open."""
        i = min(range(len(self.clients)), key=self.in_flight.__getitem__)
        self.in_flight[i] += 1
        try:
            yield self.clients[i]
        finally:
            self.in_flight[i] -= 1

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()
