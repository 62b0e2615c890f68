"""Summary of a run: latency percentiles, throughput, goodput under SLOs, errors, routing."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from prfaas.bench import routing as rt
from prfaas.bench.client import RequestResult

SCHEMA = "prfaas.bench/1"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Dist:
    """Distribution of a latency in milliseconds (percentiles: linear interpolation)."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def dist_ms(values_s: list[float]) -> Dist | None:
    """Mean / p50 / p90 / p99 / min / max of ``values_s`` (seconds) in ms; ``None`` if empty."""
    if not values_s:
        return None
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
    return Dist(len(a), float(a.mean()), p50, p90, p99, float(a.min()), float(a.max()))


@dataclass(frozen=True)
class Goodput:
    """Requests that succeeded within the SLOs (a missing SLO is not checked; TPOT is not checked
    on single-token outputs)."""

    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    requests: int
    fraction: float  # of all requests, failed ones included
    request_per_s: float


@dataclass(frozen=True)
class RoutingSummary:
    """What the server said about routing (``prfaas`` field / ``x-prfaas-*`` headers)."""

    requests_with_info: int
    by_prefill_cluster: dict[str, int]
    offloaded: int
    offload_known: int
    offload_fraction: float | None  # offloaded / offload_known
    cached_tokens_total: int
    cached_tokens_known: int
    transfer_bytes_total: int
    transfer_bytes_known: int


@dataclass(frozen=True)
class BenchReport:
    """The machine-readable report (``to_dict`` is what ``--json`` prints)."""

    config: dict[str, Any]
    total: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    input_tokens: int
    input_tokens_per_s: float
    ttft_ms: Dist | None
    tpot_ms: Dist | None
    itl_ms: Dist | None
    e2e_ms: Dist | None
    goodput: Goodput | None
    short_outputs: int  # completed with fewer tokens than max_tokens
    send_lag_ms: Dist | None  # actual send - scheduled arrival (client or --concurrency queueing)
    routing: RoutingSummary | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": SCHEMA, **d}


def _routing(results: list[RequestResult]) -> RoutingSummary | None:
    infos = [r.routing for r in results if r.routing]
    if not infos:
        return None
    clusters = Counter(str(i["prefill_cluster"]) for i in infos if "prefill_cluster" in i)
    offs = [o for o in (rt.offloaded(i) for i in infos) if o is not None]
    cached = [i["cached_tokens"] for i in infos if isinstance(i.get("cached_tokens"), int)]
    moved = [i["transfer_bytes"] for i in infos if isinstance(i.get("transfer_bytes"), int)]
    return RoutingSummary(
        requests_with_info=len(infos),
        by_prefill_cluster=dict(sorted(clusters.items())),
        offloaded=sum(offs),
        offload_known=len(offs),
        offload_fraction=(sum(offs) / len(offs)) if offs else None,
        cached_tokens_total=int(sum(cached)),
        cached_tokens_known=len(cached),
        transfer_bytes_total=int(sum(moved)),
        transfer_bytes_known=len(moved),
    )


def summarize(
    results: list[RequestResult],
    duration_s: float,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    config: dict[str, Any] | None = None,
) -> BenchReport:
    """Summarise every request of a run (failed ones count in ``total`` and ``errors``)."""
    if duration_s < 0:
        raise ValueError(f"duration must be >= 0 s, got {duration_s}")
    for name, v in (("--slo-ttft", slo_ttft_s), ("--slo-tpot", slo_tpot_s)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0 s, got {v}")
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(
        r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.input_len for r in ok
    )
    goodput = None
    if slo_ttft_s is not None or slo_tpot_s is not None:
        good = 0
        for r in ok:
            if slo_ttft_s is not None and (r.ttft_s is None or r.ttft_s > slo_ttft_s):
                continue
            tpot = r.tpot_s
            if slo_tpot_s is not None and tpot is not None and tpot > slo_tpot_s:
                continue
            good += 1
        goodput = Goodput(
            None if slo_ttft_s is None else slo_ttft_s * 1000.0,
            None if slo_tpot_s is None else slo_tpot_s * 1000.0,
            good,
            good / len(results) if results else 0.0,
            per_s(good),
        )
    tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
    return BenchReport(
        config=dict(config or {}),
        total=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        request_per_s=per_s(len(ok)),
        output_tokens=out_tokens,
        output_tokens_per_s=per_s(out_tokens),
        input_tokens=in_tokens,
        input_tokens_per_s=per_s(in_tokens),
        ttft_ms=dist_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=dist_ms(tpots),
        itl_ms=dist_ms([g for r in ok for g in r.itl_s]),
        e2e_ms=dist_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        goodput=goodput,
        short_outputs=sum(1 for r in ok if r.output_tokens < r.max_tokens),
        send_lag_ms=dist_ms(
            [max(0.0, r.sent_s - r.scheduled_s) for r in results if r.sent_s is not None]
        ),
        routing=_routing(results),
    )
