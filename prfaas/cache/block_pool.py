"""A pool of fixed-size blocks with reference counts, a hash index of full (reusable) blocks, and LRU
eviction of cached blocks that nobody references. Used for MLA latent-KV blocks and, with size-1
"blocks", for KDA state checkpoints."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class PoolExhausted(RuntimeError):
    """No free or evictable entry is left."""


class BlockPool:
    def __init__(self, num_blocks: int, name: str = "block") -> None:
        if num_blocks < 1:
            raise ValueError(f"{name} pool needs at least one entry, got {num_blocks}")
        self.name = name
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # cached blocks with ref 0, oldest first: evicted when the free list runs dry
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # called as on_evict(entry, hash) before a cached entry is reused (second-tier write-back)
        self.on_evict: Callable[[int, int], None] | None = None

    # ----- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Entries an allocation can take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    def num_in_use(self) -> int:
        return sum(1 for r in self.ref if r > 0)

    # ----- allocation -------------------------------------------------------------------------
    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            h = self.hash_of[b]
            if self.on_evict is not None and h is not None:
                self.on_evict(b, h)
            self._drop_hash(b)
        else:
            raise PoolExhausted(f"{self.name} pool exhausted ({self.num_blocks} entries in use)")
        self.ref[b] = 1
        return b

    def allocate_many(self, n: int) -> list[int]:
        if n > self.num_free:
            raise PoolExhausted(
                f"{self.name} pool: need {n} entries, only {self.num_free} free or evictable"
            )
        return [self.allocate() for _ in range(n)]

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            self._evictable.pop(b, None)
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise RuntimeError(f"{self.name} {b} freed more often than allocated")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.hash_of[b] is not None:
                self._evictable[b] = None
            else:
                self._free.append(b)

    # ----- hashing ----------------------------------------------------------------------------
    def lookup(self, h: int) -> int | None:
        return self.by_hash.get(h)

    def touch(self, b: int) -> None:
        """Mark a cached entry recently used (LRU)."""
        if b in self._evictable:
            self._evictable.move_to_end(b)

    def set_hash(self, b: int, h: int) -> bool:
        """Publish entry b under hash h; False if another entry already holds h."""
        if h in self.by_hash:
            return self.by_hash[h] == b
        if self.hash_of[b] is not None:
            return False
        self.hash_of[b] = h
        self.by_hash[h] = b
        return True

    def _drop_hash(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None:
            del self.by_hash[h]
            self.hash_of[b] = None

    def check(self) -> None:
        """Invariants (tests): every entry is exactly one of free, evictable or referenced."""
        free, ev = set(self._free), set(self._evictable)
        assert not free & ev, "entry both free and evictable"
        for b in range(self.num_blocks):
            states = (b in free) + (b in ev) + (self.ref[b] > 0)
            assert states == 1, f"{self.name} {b}: ref={self.ref[b]} free={b in free} ev={b in ev}"
