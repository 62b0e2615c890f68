"""What the load client sends: one :class:`BenchRequest` per arrival, from a Mooncake trace or a
synthetic Poisson / log-normal workload, with time scaling, a request cap and length caps."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from prfaas.scheduling.lengths import TruncatedLogNormal

# the paper's synthetic workload (truncated log-normal prompt lengths, fixed output length)
LOGNORMAL_MU = 9.90
LOGNORMAL_SIGMA = 1.00
LOGNORMAL_MIN = 128
LOGNORMAL_MAX = 131072
SYNTHETIC_OUTPUT_LEN = 1024


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to replay: arrival offset (s), prompt / output tokens, prefix-block ids."""

    index: int
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def load_trace(path: str | Path, limit: int | None = None) -> list[BenchRequest]:
    """Read a Mooncake JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``,
    ``hash_ids``); arrivals are shifted so the first is at 0 and sorted (stable)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such trace file: {p}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                r = json.loads(line)
                t = float(r["timestamp"]) / 1000.0
                inp, out = int(r["input_length"]), int(r["output_length"])
                hs = tuple(int(h) for h in r.get("hash_ids", ()))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{p}:{lineno}: bad Mooncake record ({e})") from e
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"{p}:{lineno}: timestamp must be a finite value >= 0")
            if inp < 1:
                raise ValueError(f"{p}:{lineno}: input_length must be >= 1, got {inp}")
            if out < 0:
                raise ValueError(f"{p}:{lineno}: output_length must be >= 0, got {out}")
            rows.append((t, inp, max(out, 1), hs))
    if not rows:
        raise ValueError(f"{p}: no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [BenchRequest(i, t - t0, inp, out, hs) for i, (t, inp, out, hs) in enumerate(rows)]


def synthetic_lognormal(
    rate: float,
    num_requests: int,
    output_len: int = SYNTHETIC_OUTPUT_LEN,
    mu: float = LOGNORMAL_MU,
    sigma: float = LOGNORMAL_SIGMA,
    lo: int = LOGNORMAL_MIN,
    hi: int = LOGNORMAL_MAX,
    seed: int = 0,
) -> list[BenchRequest]:
    """Poisson arrivals at ``rate`` req/s, truncated log-normal prompt lengths (the paper's
    workload), fixed output length; no shared prefixes (``hash_ids`` empty)."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"--rate must be a finite value > 0 req/s, got {rate}")
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if output_len < 1:
        raise ValueError(f"output length must be >= 1, got {output_len}")
    if not 1 <= lo < hi:
        raise ValueError(f"need 1 <= lo < hi, got lo={lo} hi={hi}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    lens = np.clip(np.rint(TruncatedLogNormal(mu, sigma, lo, hi).sample(num_requests, rng)), lo, hi)
    return [
        BenchRequest(i, float(arrivals[i]), int(lens[i]), output_len) for i in range(num_requests)
    ]


def prepare(
    requests: list[BenchRequest],
    time_scale: float = 1.0,
    max_requests: int | None = None,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    skip_requests: int = 0,
) -> list[BenchRequest]:
    """Drop the first ``skip_requests`` (arrivals then start at the first kept one), stretch
    arrivals by ``time_scale`` (> 1 slower, < 1 faster), keep the first ``max_requests`` and cap
    prompt / output lengths (prefix-block ids are kept: a capped prompt is a prefix of the full
    one)."""
    if skip_requests < 0:
        raise ValueError(f"--skip-requests must be >= 0, got {skip_requests}")
    if skip_requests:
        requests = requests[skip_requests:]
        t0 = requests[0].arrival_s if requests else 0.0
        requests = [replace(r, arrival_s=r.arrival_s - t0) for r in requests]
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"--time-scale must be a finite value > 0, got {time_scale}")
    for name, v in (
        ("--max-requests", max_requests),
        ("--max-input-tokens", max_input_tokens),
        ("--max-output-tokens", max_output_tokens),
    ):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    reqs = requests if max_requests is None else requests[:max_requests]
    out = []
    for r in reqs:
        inp = r.input_len if max_input_tokens is None else min(r.input_len, max_input_tokens)
        o = r.output_len if max_output_tokens is None else min(r.output_len, max_output_tokens)
        out.append(replace(r, arrival_s=r.arrival_s * time_scale, input_len=inp, output_len=o))
    return out
