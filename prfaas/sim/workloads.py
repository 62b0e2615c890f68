"""Workloads for the simulator: arrival times, prompt/output lengths and optional prefix-block ids.

Sources: Mooncake JSONL traces, the paper's truncated log-normal lengths with Poisson arrivals (and a
bursty variant), BurstGPT CSV and Azure LLM-inference CSV.  Time scaling and rate changes return new
workloads.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from prfaas.scheduling.lengths import TruncatedLogNormal


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival; ``hash_ids`` is ``None`` when the source has no prefix ids."""

    name: str
    arrival_s: np.ndarray  # float64, non-decreasing, seconds
    input_len: np.ndarray  # int64 prompt tokens
    output_len: np.ndarray  # int64 output tokens
    hash_ids: list[tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.input_len) != n or len(self.output_len) != n:
            raise ValueError("arrival_s, input_len and output_len must have equal lengths")
        if self.hash_ids is not None and len(self.hash_ids) != n:
            raise ValueError("hash_ids must have one entry per request")
        if n and (np.any(np.diff(self.arrival_s) < 0) or self.arrival_s[0] < 0):
            raise ValueError("arrival times must be >= 0 and non-decreasing")
        if n and (self.input_len.min() < 1 or self.output_len.min() < 1):
            raise ValueError("input and output lengths must be >= 1 token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate (req/s) over the span of the arrivals."""
        return (len(self) - 1) / self.duration_s if len(self) > 1 and self.duration_s > 0 else 0.0

    def time_scaled(self, factor: float) -> Workload:
        """Stretch (factor > 1) or compress (factor < 1) the arrival times."""
        if not factor > 0:
            raise ValueError(f"time scale factor must be > 0, got {factor}")
        return Workload(
            f"{self.name}x{factor:g}",
            self.arrival_s * factor,
            self.input_len,
            self.output_len,
            self.hash_ids,
        )

    def with_rate(self, rate: float) -> Workload:
        """Rescale arrival times so the mean rate is ``rate`` req/s (keeps the burst shape)."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0 req/s, got {rate}")
        if self.rate <= 0:
            raise ValueError("workload has no arrival span to rescale")
        return self.time_scaled(self.rate / rate)

    def head(self, n: int) -> Workload:
        if n < 0:
            raise ValueError("n must be >= 0")
        h = None if self.hash_ids is None else self.hash_ids[:n]
        return Workload(self.name, self.arrival_s[:n], self.input_len[:n], self.output_len[:n], h)


def _mk(name: str, t, inp, out, hashes=None) -> Workload:
    t = np.asarray(t, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - (t.min() if len(t) else 0.0)
    inp = np.asarray(inp, dtype=np.int64)[order]
    out = np.asarray(out, dtype=np.int64)[order]
    if hashes is not None:
        hashes = [hashes[i] for i in order]
    return Workload(name, t, inp, out, hashes)


def load_mooncake(path: str | Path, limit: int | None = None) -> Workload:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such trace file: {p}")
    t, inp, out, hs = [], [], [], []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                t.append(float(r["timestamp"]) / 1000.0)
                inp.append(int(r["input_length"]))
                out.append(int(r["output_length"]))
                hs.append(tuple(int(h) for h in r.get("hash_ids", ())))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{p}:{lineno}: bad Mooncake record ({e})") from e
            if limit is not None and len(t) >= limit:
                break
    if not t:
        raise ValueError(f"{p}: no requests")
    return _mk(p.stem, t, inp, np.maximum(out, 1), hs)


def _read_csv(path: str | Path, need: tuple[str, ...]) -> list[dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such CSV file: {p}")
    with p.open(newline="") as f:
        rd = csv.DictReader(f)
        cols = [c.strip() for c in (rd.fieldnames or [])]
        missing = [c for c in need if c not in cols]
        if missing:
            raise ValueError(f"{p}: missing columns {missing} (has {cols})")
        rows = [{k.strip(): v for k, v in r.items() if k is not None} for r in rd]
    if not rows:
        raise ValueError(f"{p}: no rows")
    return rows


def load_burstgpt(path: str | Path, model: str | None = None, drop_failed: bool = True) -> Workload:
    """BurstGPT CSV: ``Timestamp`` (s), ``Model``, ``Request tokens``, ``Response tokens``,
    ``Total tokens``, ``Log Type``.  Rows with 0 response tokens (failures) are dropped by default."""
    rows = _read_csv(path, ("Timestamp", "Request tokens", "Response tokens"))
    t, inp, out = [], [], []
    for i, r in enumerate(rows, 2):
        if model is not None and r.get("Model") != model:
            continue
        try:
            ts, a, b = (
                float(r["Timestamp"]),
                int(float(r["Request tokens"])),
                int(float(r["Response tokens"])),
            )
        except ValueError as e:
            raise ValueError(f"{path}:{i}: bad BurstGPT row ({e})") from e
        if b <= 0 and drop_failed:
            continue
        t.append(ts)
        inp.append(max(a, 1))
        out.append(max(b, 1))
    if not t:
        raise ValueError(f"{path}: no usable BurstGPT rows")
    return _mk(Path(path).stem, t, inp, out)


def _azure_time(s: str) -> float:
    s = s.strip()
    if "." in s:  # Azure writes 7 fractional digits; datetime takes 6
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError as e:
        raise ValueError(f"bad Azure TIMESTAMP {s!r}") from e


def load_azure(path: str | Path) -> Workload:
    """Azure LLM-inference CSV (2023/2024): ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``."""
    rows = _read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    t, inp, out = [], [], []
    for i, r in enumerate(rows, 2):
        try:
            t.append(_azure_time(r["TIMESTAMP"]))
            inp.append(max(int(r["ContextTokens"]), 1))
            out.append(max(int(r["GeneratedTokens"]), 1))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: bad Azure row ({e})") from e
    return _mk(Path(path).stem, t, inp, out)


def poisson_lognormal(
    rate: float,
    n: int,
    mu: float = 9.90,
    sigma: float = 1.00,
    lo: int = 128,
    hi: int = 131072,
    output_len: int = 1024,
    seed: int = 0,
) -> Workload:
    """The paper's workload: Poisson arrivals at ``rate``, truncated log-normal input, fixed output."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if output_len < 1:
        raise ValueError("output_len must be >= 1")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    lens = np.rint(TruncatedLogNormal(mu, sigma, lo, hi).sample(n, rng)).astype(np.int64)
    return Workload(
        f"poisson{rate:g}", np.cumsum(gaps), np.clip(lens, lo, hi), np.full(n, output_len, np.int64)
    )


def bursty_poisson(
    rate: float,
    n: int,
    burst_factor: float = 3.0,
    burst_s: float = 30.0,
    period_s: float = 300.0,
    seed: int = 0,
    **lengths,
) -> Workload:
    """Poisson arrivals whose rate is ``burst_factor`` × the base rate for ``burst_s`` seconds at the
    start of every ``period_s``; the base rate is set so the long-run mean is ``rate``."""
    if not (rate > 0 and burst_factor >= 1 and 0 < burst_s <= period_s):
        raise ValueError("need rate > 0, burst_factor >= 1 and 0 < burst_s <= period_s")
    base = rate * period_s / (period_s + (burst_factor - 1) * burst_s)
    rng = np.random.default_rng(seed + 1)
    t, out = 0.0, np.empty(n)
    for i in range(n):  # thinning of a piecewise-constant rate
        lam_max = base * burst_factor
        while True:
            t += rng.exponential(1.0 / lam_max)
            lam = lam_max if (t % period_s) < burst_s else base
            if rng.random() * lam_max <= lam:
                break
        out[i] = t
    w = poisson_lognormal(rate, n, seed=seed, **lengths)
    return Workload(f"bursty{rate:g}x{burst_factor:g}", out - out[0], w.input_len, w.output_len)


def load_workload(spec: str, **kw) -> Workload:
    """Load by file type: ``.jsonl`` Mooncake; ``.csv`` BurstGPT or Azure (by header)."""
    p = Path(spec)
    if p.suffix == ".jsonl":
        return load_mooncake(p, **kw)
    if p.suffix == ".csv":
        if not p.is_file():
            raise ValueError(f"no such CSV file: {p}")
        head = p.open().readline()
        return load_azure(p) if "TIMESTAMP" in head else load_burstgpt(p, **kw)
    raise ValueError(f"unknown workload file type {p.suffix!r} (want .jsonl or .csv)")


def rate_sweep(base: Workload, rates: list[float] | tuple[float, ...]) -> list[Workload]:
    """The same requests replayed at each mean rate (time-scaled copies: common random numbers)."""
    if not rates:
        raise ValueError("rate sweep needs at least one rate")
    return [base.with_rate(r) for r in rates]
