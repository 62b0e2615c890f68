"""Highest arrival rate a simulated system sustains (queues bounded), by bisection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prfaas.scheduling.policies import Policy
from prfaas.sim.deployment import Deployment
from prfaas.sim.engine import Simulator
from prfaas.sim.options import SimOptions
from prfaas.sim.workloads import Workload, poisson_lognormal


@dataclass(frozen=True)
class RateProbe:
    rate: float
    slope: float  # in-system growth over the second half per arrival (≈ 1 - capacity/rate if > 0)
    sustained: bool


def in_system_slope(t: np.ndarray, q: np.ndarray, rate: float) -> float:
    """Least-squares slope of requests-in-system over the second half of the run, per arrival."""
    t, q = np.asarray(t, float), np.asarray(q, float)
    if t.size < 10:
        raise ValueError("need >= 10 monitor ticks to judge queue growth")
    m = t >= t[-1] / 2
    return float(np.polyfit(t[m], q[m], 1)[0] / rate)


def probe(
    deployment: Deployment,
    make_policy: Callable[[], Policy],
    base: Workload,
    rate: float,
    horizon_s: float,
    tol: float = 0.015,
) -> RateProbe:
    """Run ``base`` (unit-rate arrivals) compressed to ``rate`` for ``horizon_s`` seconds."""
    w = base.time_scaled(base.rate / rate)
    n = int(np.searchsorted(w.arrival_s, horizon_s))
    res = Simulator(
        deployment, make_policy(), SimOptions(until_s=horizon_s, tick_s=horizon_s / 400)
    ).run(w.head(n))
    s = in_system_slope(np.asarray(res.series["t"]), np.asarray(res.series["in_system"]), rate)
    return RateProbe(rate, s, s < tol)


def max_sustained_rate(
    deployment: Deployment,
    make_policy: Callable[[], Policy],
    guess: float,
    horizon_s: float = 12000.0,
    lo_frac: float = 0.85,
    hi_frac: float = 1.15,
    steps: int = 5,
    seed: int = 0,
    tol: float = 0.015,
    workload: Workload | None = None,
) -> tuple[float, list[RateProbe]]:
    """Bisection on the Poisson rate in ``[lo_frac, hi_frac] × guess``; returns (rate, probes).

    All probes replay one arrival sequence, scaled in time (common random numbers)."""
    if not guess > 0 or not 0 < lo_frac < hi_frac or steps < 1 or not horizon_s > 0:
        raise ValueError("need guess > 0, 0 < lo_frac < hi_frac, steps >= 1, horizon_s > 0")
    n = int(guess * hi_frac * horizon_s * 1.05) + 10
    base = workload if workload is not None else poisson_lognormal(1.0, n, seed=seed)
    lo, hi = guess * lo_frac, guess * hi_frac
    probes = []
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        p = probe(deployment, make_policy, base, mid, horizon_s, tol)
        probes.append(p)
        if p.sustained:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi), probes
