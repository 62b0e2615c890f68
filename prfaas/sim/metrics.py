"""Summaries of a simulation: latency percentiles, throughput, goodput, offload, egress, caches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prfaas.sim.result import SimResult


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 10.0
    tpot_s: float = 1 / 40  # 40 tokens/s decode SLO

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError("SLO limits must be > 0")


def pct(x: np.ndarray) -> dict[str, float]:
    """Mean, P50, P90, P99 of the finite values (NaN when there are none)."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(res: SimResult, slo: SLO | None = None, warmup_s: float = 0.0) -> dict:
    """The per-system JSON summary; requests arriving before ``warmup_s`` are left out of latency."""
    slo = slo or SLO()
    done = np.isfinite(res.done)
    n_done = int(done.sum())
    t0 = float(res.arrival[0])
    t1 = float(np.nanmax(res.done)) if n_done else t0
    span = max(t1 - t0, 1e-9)
    sel = res.arrival >= warmup_s
    ttft, tpot, e2e = res.ttft[sel], res.tpot[sel], res.e2e[sel]
    good = done & (res.ttft <= slo.ttft_s) & (res.tpot <= slo.tpot_s * (1 + 1e-9))
    routed = res.prefill_cluster >= 0
    ser = res.series
    egress = {
        k[: -len(".gbps")]: float(np.mean(v)) if v else 0.0
        for k, v in ser.items()
        if k.endswith(".gbps")
    }
    cache = {}
    for ci, name in enumerate(res.clusters):
        m = res.prefill_cluster == ci
        tok = res.input_len[m].sum()
        cache[name] = float(res.cached[m].sum() / tok) if tok else 0.0
    queues = {
        k: {"mean": float(np.mean(v)), "max": float(np.max(v))}
        for k, v in ser.items()
        if (k.endswith("_queue") or k.endswith("_waiting")) and v
    }
    return {
        "system": res.system,
        "workload": res.workload,
        "requests": res.n,
        "completed": n_done,
        "throughput_rps": n_done / span,
        "goodput_rps": int(good.sum()) / span,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "ttft": pct(ttft),
        "tpot": pct(tpot),
        "e2e": pct(e2e),
        "offload_fraction": float(res.offloaded[routed].mean()) if routed.any() else 0.0,
        "egress_gbps_mean": float(sum(egress.values())),
        "egress_gbps_by_link": egress,
        "cross_cluster_bytes": float(res.cross_bytes.sum()),
        "cache_hit_rate": cache,
        "queues": queues,
        "sim_end_s": res.end_s,
        "wall_s": res.wall_s,
    }


def in_system_growth(res: SimResult, rate: float) -> float:
    """Growth of requests in the system over the second half of the run, as a share of the arrivals
    in that half: ~0 when queues stay bounded, ~(1 - capacity/rate) when they grow."""
    t = np.asarray(res.series["t"])
    q = np.asarray(res.series["in_system"], dtype=float)
    if t.size < 10:
        raise ValueError("run too short: need >= 10 monitor ticks")
    T = t[-1]
    a = q[(t >= 0.4 * T) & (t < 0.5 * T)].mean()
    b = q[t >= 0.9 * T].mean()
    return float((b - a) / (rate * 0.45 * T))
