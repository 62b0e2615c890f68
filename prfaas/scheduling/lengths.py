"""Uncached-prefill-length distributions for the planner and the simulator.

Conventions: ``prob_above(t) = P(L > t)``, ``mean_above(t) = E[L | L > t]``,
``mean_below(t) = E[L | L <= t]``. Where the conditioning set is empty the conditional mean is the
limit at that end of the support (``hi`` / largest sample above, ``lo`` / smallest sample below),
so the planner's formulas stay finite at the grid ends.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy.special import ndtr


class LengthDist(ABC):
    """A distribution of uncached prefill lengths (tokens)."""

    @abstractmethod
    def prob_above(self, t: float) -> float: ...

    @abstractmethod
    def mean_above(self, t: float) -> float: ...

    @abstractmethod
    def mean_below(self, t: float) -> float: ...

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray: ...

    @abstractmethod
    def mean(self) -> float: ...

    @property
    @abstractmethod
    def support(self) -> tuple[float, float]: ...


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class TruncatedLogNormal(LengthDist):
    """ln L ~ N(mu, sigma²), truncated to [lo, hi] (closed-form moments)."""

    def __init__(self, mu: float, sigma: float, lo: float, hi: float) -> None:
        if not (math.isfinite(mu) and math.isfinite(sigma)) or sigma <= 0:
            raise ValueError(f"need finite mu and sigma > 0, got mu={mu}, sigma={sigma}")
        if not (0 < lo < hi) or not math.isfinite(hi):
            raise ValueError(f"need 0 < lo < hi < inf, got lo={lo}, hi={hi}")
        self.mu, self.sigma, self.lo, self.hi = float(mu), float(sigma), float(lo), float(hi)
        self._z = self._cdf_raw(self.hi) - self._cdf_raw(self.lo)
        if self._z <= 0:
            raise ValueError("truncation interval holds no probability mass")

    def __repr__(self) -> str:
        return f"TruncatedLogNormal(mu={self.mu}, sigma={self.sigma}, lo={self.lo}, hi={self.hi})"

    @property
    def support(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def _cdf_raw(self, x: float) -> float:
        return float(ndtr((math.log(x) - self.mu) / self.sigma))

    def _partial_mean(self, a: float, b: float) -> float:
        """E[L; a < L <= b] for the untruncated law."""
        s = self.sigma
        k = math.exp(self.mu + s * s / 2)
        return k * float(
            ndtr((math.log(b) - self.mu - s * s) / s) - ndtr((math.log(a) - self.mu - s * s) / s)
        )

    def _clip(self, t: float) -> float:
        return min(max(float(t), self.lo), self.hi)

    def cdf(self, t: float) -> float:
        """P(L <= t)."""
        return (self._cdf_raw(self._clip(t)) - self._cdf_raw(self.lo)) / self._z

    def prob_above(self, t: float) -> float:
        return 1.0 - self.cdf(t)

    def mean_above(self, t: float) -> float:
        tc = self._clip(t)
        p = (self._cdf_raw(self.hi) - self._cdf_raw(tc)) / self._z
        if p <= 1e-15:
            return self.hi
        return self._partial_mean(tc, self.hi) / self._z / p

    def mean_below(self, t: float) -> float:
        tc = self._clip(t)
        q = (self._cdf_raw(tc) - self._cdf_raw(self.lo)) / self._z
        if q <= 1e-15:
            return self.lo
        return self._partial_mean(self.lo, tc) / self._z / q

    def mean(self) -> float:
        return self._partial_mean(self.lo, self.hi) / self._z

    def quantile(self, q: float) -> float:
        if not 0 <= q <= 1:
            raise ValueError(f"quantile needs 0 <= q <= 1, got {q}")
        from scipy.special import ndtri

        u = self._cdf_raw(self.lo) + q * self._z
        return self._clip(math.exp(self.mu + self.sigma * float(ndtri(min(max(u, 0.0), 1.0)))))

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """n lengths (float) by inverse-CDF sampling."""
        if n < 0:
            raise ValueError("n must be >= 0")
        from scipy.special import ndtri

        u = _rng(rng).uniform(self._cdf_raw(self.lo), self._cdf_raw(self.hi), size=n)
        return np.clip(np.exp(self.mu + self.sigma * ndtri(u)), self.lo, self.hi)


class Empirical(LengthDist):
    """The empirical law of observed lengths (e.g. uncached lengths of a trace window)."""

    def __init__(self, samples: Iterable[float]) -> None:
        x = np.sort(
            np.asarray(list(samples) if not isinstance(samples, np.ndarray) else samples, float)
        )
        if x.ndim != 1 or x.size == 0:
            raise ValueError("Empirical needs a non-empty 1-D sequence of lengths")
        if not np.all(np.isfinite(x)) or x[0] < 0:
            raise ValueError("lengths must be finite and >= 0")
        self.samples = x
        self._csum = np.concatenate([[0.0], np.cumsum(x)])

    def __repr__(self) -> str:
        return f"Empirical(n={self.samples.size}, mean={self.mean():.1f})"

    @property
    def support(self) -> tuple[float, float]:
        return (float(self.samples[0]), float(self.samples[-1]))

    def _k(self, t: float) -> int:
        """Number of samples <= t."""
        return int(np.searchsorted(self.samples, t, side="right"))

    def prob_above(self, t: float) -> float:
        return 1.0 - self._k(t) / self.samples.size

    def mean_above(self, t: float) -> float:
        k, n = self._k(t), self.samples.size
        if k == n:
            return float(self.samples[-1])
        return float((self._csum[n] - self._csum[k]) / (n - k))

    def mean_below(self, t: float) -> float:
        k = self._k(t)
        if k == 0:
            return float(self.samples[0])
        return float(self._csum[k] / k)

    def mean(self) -> float:
        return float(self._csum[-1] / self.samples.size)

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        if n < 0:
            raise ValueError("n must be >= 0")
        return _rng(rng).choice(self.samples, size=n, replace=True)

    @classmethod
    def from_trace(
        cls, path: str | Path, block_tokens: int = 512, prefix_cache: bool = True
    ) -> Empirical:
        """Uncached lengths of a Mooncake-format JSONL trace (see :func:`uncached_lengths`)."""
        return cls(uncached_lengths(read_trace(path), block_tokens, prefix_cache))


def read_trace(path: str | Path) -> list[dict]:
    """Records of a JSONL trace (``input_length``, ``output_length``, ``hash_ids``, ``timestamp``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such trace file: {p}")
    out = []
    with p.open() as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i}: bad JSON ({e})") from e
    if not out:
        raise ValueError(f"{p}: empty trace")
    return out


def uncached_lengths(
    records: Iterable[dict], block_tokens: int = 512, prefix_cache: bool = True
) -> np.ndarray:
    """Uncached prefill length of each request, in arrival order.

    Model: one unbounded prefix cache that holds every block-aligned prefix seen before (a request's
    full blocks become reusable for later requests). A request whose ``hash_ids`` agree with a
    cached prefix for its first k blocks reuses ``k * block_tokens`` tokens, capped so at least one
    token is prefilled. ``prefix_cache=False`` returns the raw input lengths.
    """
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    trie: dict[tuple[int, object], int] = {}  # (parent node, block id) -> node
    out = []
    for r in records:
        if "input_length" not in r:
            raise ValueError("trace record misses input_length")
        n = int(r["input_length"])
        if n < 1:
            raise ValueError(f"input_length must be >= 1, got {n}")
        if not prefix_cache:
            out.append(n)
            continue
        ids = tuple(r.get("hash_ids") or ())
        full = min(len(ids), n // block_tokens)
        k, node, matching = 0, 0, True
        for j in range(full):
            key = (node, ids[j])
            nxt = trie.get(key)
            if nxt is None:
                matching = False
                nxt = trie[key] = len(trie) + 1
            elif matching:
                k += 1
            node = nxt
        out.append(max(1, n - k * block_tokens))
    return np.asarray(out, dtype=float)
