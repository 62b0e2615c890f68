"""Per-cluster prefix-cache index over ``hash_ids`` blocks, with a block capacity and LRU eviction.

Equal ids mean the same prefix block, and a prefix matches only as long as a request's id list agrees
from the start, so a lookup walks the list until the first block that is not cached.  Only whole
blocks are inserted (prefix-cache blocks are completely filled before reuse).  Each block remembers the
instance that produced it, for cache-affinity routing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from prfaas.scheduling.types import BLOCK_TOKENS


class PrefixIndex:
    """LRU set of cached prefix blocks of one cluster."""

    __slots__ = (
        "capacity",
        "block_tokens",
        "_blocks",
        "hits",
        "lookups",
        "hit_tokens",
        "req_tokens",
    )

    def __init__(self, capacity_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {block_tokens}")
        self.capacity = int(capacity_blocks)
        self.block_tokens = int(block_tokens)
        self._blocks: OrderedDict[int, int] = OrderedDict()  # block id -> producing instance
        self.hits = 0
        self.lookups = 0
        self.hit_tokens = 0
        self.req_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def match_blocks(self, hash_ids: Sequence[int]) -> int:
        """Number of leading blocks of ``hash_ids`` that are cached (no LRU update)."""
        blocks = self._blocks
        n = 0
        for h in hash_ids:
            if h not in blocks:
                break
            n += 1
        return n

    def match_tokens(self, hash_ids: Sequence[int], prompt_len: int) -> int:
        """Cached prefix in tokens: whole blocks of the prompt only, at least one token left."""
        n = self.match_blocks(hash_ids[: prompt_len // self.block_tokens])
        return min(n * self.block_tokens, max(prompt_len - 1, 0))

    def owner(self, hash_ids: Sequence[int], n_blocks: int) -> int:
        """Instance that produced the last matched block (-1 if ``n_blocks`` is 0)."""
        if n_blocks <= 0:
            return -1
        return self._blocks.get(hash_ids[n_blocks - 1], -1)

    def lookup(self, hash_ids: Sequence[int], prompt_len: int) -> int:
        """Like :meth:`match_tokens` but counts the lookup in the hit statistics and touches LRU."""
        blocks = self._blocks
        n = 0
        for h in hash_ids[: prompt_len // self.block_tokens]:
            if h not in blocks:
                break
            blocks.move_to_end(h)
            n += 1
        tokens = min(n * self.block_tokens, max(prompt_len - 1, 0))
        self.lookups += 1
        self.req_tokens += prompt_len
        if tokens > 0:
            self.hits += 1
            self.hit_tokens += tokens
        return tokens

    def insert(self, hash_ids: Sequence[int], prompt_len: int, instance: int = -1) -> int:
        """Cache the whole blocks of a prompt after its prefill; returns blocks evicted."""
        if self.capacity == 0:
            return 0
        full = min(len(hash_ids), prompt_len // self.block_tokens)
        blocks = self._blocks
        for i in range(full):
            h = hash_ids[i]
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = instance
        evicted = 0
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
            evicted += 1
        return evicted

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens served from cache over all lookups."""
        return self.hit_tokens / self.req_tokens if self.req_tokens else 0.0
