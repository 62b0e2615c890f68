"""PrfaaS throughput model (paper Eqs. 1-8): capacity of a fleet, optimal threshold and PD split.

Stages of a PrfaaS-PD deployment: a PrfaaS cluster of ``n_prfaas`` prefill instances behind a link
of ``link_gbps``, a local PD cluster of ``n_p`` prefill and ``n_d`` decode instances. With threshold
``t`` over the uncached-length law L (``p = P(L > t)``, ``l_long = E[L|L>t]``, ``l_short = E[L|L<=t]``):

* ``Θ_prfaas = min(n_prfaas / T_prfaas(l_long), B_out / S_kv(l_long))``   (Eq. 3)
* ``Θ_pd-p = n_p / T_pd(l_short)``                                        (Eq. 4)
* ``Θ_pd-d = n_d · BS_max / (T_decode · L_out)``                          (Eq. 5)
* ``Λ_max = min(Θ_prfaas / p, Θ_pd-p / (1 - p), Θ_pd-d)``                 (Eq. 6)

``threshold=None`` means no length routing: homogeneous PD (no PrfaaS instances, p = 0, every
request at the mean length) or naive heterogeneous (no PD-P instances, p = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from prfaas.scheduling.lengths import Empirical, LengthDist
from prfaas.scheduling.profile import HardwareProfile


@dataclass(frozen=True)
class Fleet:
    """Hardware and sizes of one deployment (instance counts, not GPUs)."""

    prfaas: HardwareProfile | None
    pd: HardwareProfile
    decode: HardwareProfile
    n_prfaas: int
    n_p: int
    n_d: int
    link_gbps: float
    output_len: float

    def __post_init__(self) -> None:
        for k in ("n_prfaas", "n_p", "n_d"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.n_prfaas > 0 and self.prfaas is None:
            raise ValueError("n_prfaas > 0 needs a prfaas profile")
        if not (self.link_gbps > 0 and math.isfinite(self.link_gbps)):
            raise ValueError(f"link_gbps must be positive and finite, got {self.link_gbps}")
        if not self.output_len > 0:
            raise ValueError(f"output_len must be positive, got {self.output_len}")
        if not self.decode.has_decode:
            raise ValueError(f"decode profile {self.decode.name!r} lacks bs_max/t_decode_s")

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8

    def gpus(self) -> dict[str, int]:
        """GPU count per hardware kind name."""
        out: dict[str, int] = {}
        parts = [(self.prfaas, self.n_prfaas), (self.pd, self.n_p), (self.decode, self.n_d)]
        for prof, n in parts:
            if prof is not None and n:
                out[prof.name] = out.get(prof.name, 0) + n * prof.gpus_per_instance
        return out

    def cost_per_hour(self) -> float:
        """Sum of GPU prices (raises if a used profile has no price)."""
        total = 0.0
        for prof, n in [(self.prfaas, self.n_prfaas), (self.pd, self.n_p), (self.decode, self.n_d)]:
            if prof is None or n == 0:
                continue
            if prof.gpu_price_per_hour is None:
                raise ValueError(f"profile {prof.name!r} has no gpu_price_per_hour")
            total += n * prof.gpus_per_instance * prof.gpu_price_per_hour
        return total


@dataclass(frozen=True)
class Capacity:
    """Throughput of a fleet at a threshold (req/s; lengths in tokens)."""

    threshold: float | None
    n_prfaas: int
    n_p: int
    n_d: int
    theta_prfaas: float
    theta_pd_p: float
    theta_pd_d: float
    lambda_max: float
    offload_fraction: float
    l_long: float | None
    l_short: float | None
    egress_gbps: float
    bound: str = ""  # which stage limits lambda_max: "prfaas", "pd_p" or "pd_d"
    prfaas_bandwidth_bound: bool = False  # Eq. 3's bandwidth term is the smaller one

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(dist: LengthDist, t: float | None) -> tuple[float, float | None, float | None]:
    if t is None:
        return 0.0, None, dist.mean()
    p = dist.prob_above(t)
    l_long = dist.mean_above(t) if p > 0 else None
    l_short = dist.mean_below(t) if p < 1 else None
    return p, l_long, l_short


def _capacity(fleet: Fleet, t: float | None, p: float, l_long, l_short) -> Capacity:
    th_f, bw_bound, egress_per_req = 0.0, False, 0.0
    if fleet.n_prfaas > 0 and l_long is not None:
        comp = fleet.n_prfaas / float(fleet.prfaas.t_prefill(l_long))
        kv = float(fleet.prfaas.s_kv(l_long))
        bw = fleet.link_bytes_per_s / kv
        th_f, bw_bound, egress_per_req = min(comp, bw), bw < comp, kv
    th_p = fleet.n_p / float(fleet.pd.t_prefill(l_short)) if (fleet.n_p and l_short) else 0.0
    th_d = fleet.n_d * fleet.decode.decode_rate(fleet.output_len)
    terms = {
        "prfaas": th_f / p if p > 0 else math.inf,
        "pd_p": th_p / (1 - p) if p < 1 else math.inf,
        "pd_d": th_d,
    }
    bound = min(terms, key=terms.get)
    lam = terms[bound]
    egress = lam * p * egress_per_req * 8 / 1e9
    return Capacity(
        threshold=None if t is None else float(t),
        n_prfaas=fleet.n_prfaas,
        n_p=fleet.n_p,
        n_d=fleet.n_d,
        theta_prfaas=th_f,
        theta_pd_p=th_p,
        theta_pd_d=th_d,
        lambda_max=lam,
        offload_fraction=p,
        l_long=l_long,
        l_short=l_short,
        egress_gbps=egress,
        bound=bound,
        prfaas_bandwidth_bound=bw_bound,
    )


def evaluate(dist: LengthDist, fleet: Fleet, threshold: float | None) -> Capacity:
    """Eqs. 3-6 at one threshold. ``None``: no routing (homogeneous PD or naive heterogeneous)."""
    if threshold is None:
        if fleet.n_prfaas > 0 and fleet.n_p > 0:
            raise ValueError("threshold=None needs n_prfaas == 0 (homogeneous) or n_p == 0 (naive)")
        if fleet.n_prfaas > 0:  # naive heterogeneous: everything prefilled in PrfaaS
            return _capacity(fleet, None, 1.0, dist.mean(), None)
        return _capacity(fleet, None, 0.0, None, dist.mean())
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return _capacity(fleet, threshold, *_stats(dist, threshold))


def default_grid(dist: LengthDist, step: float | None = None) -> np.ndarray:
    """Candidate thresholds: 0 (offload all), an even grid over the support (about 2000 points
    unless ``step`` is given), the support's top (offload none); for Empirical also every sample."""
    lo, hi = dist.support
    if step is None:
        step = max(1.0, (hi - lo) / 2000)
    if step <= 0:
        raise ValueError("grid step must be positive")
    g = [np.array([0.0, hi]), np.arange(lo, hi, step)]
    if isinstance(dist, Empirical):
        g.append(np.unique(dist.samples))
    return np.unique(np.concatenate(g))


def _check_grid(grid: Sequence[float] | np.ndarray) -> np.ndarray:
    g = np.asarray(grid, dtype=float).ravel()
    if g.size == 0 or not np.all(np.isfinite(g)) or np.any(g < 0):
        raise ValueError("threshold grid must be non-empty, finite and >= 0")
    return g


def sweep_threshold(dist: LengthDist, fleet: Fleet, grid=None) -> list[Capacity]:
    """Capacity at every threshold of the grid (fixed split)."""
    g = default_grid(dist) if grid is None else _check_grid(grid)
    return [evaluate(dist, fleet, float(t)) for t in g]


def best_threshold(dist: LengthDist, fleet: Fleet, grid=None) -> Capacity:
    """1-D search over t at the fleet's fixed split (no PrfaaS or no PD-P: no routing)."""
    if fleet.n_prfaas == 0 or fleet.n_p == 0:
        return evaluate(dist, fleet, None)
    return max(sweep_threshold(dist, fleet, grid), key=_rank)


def _rank(c: Capacity) -> tuple[float, float]:
    """Λ_max first (to 1e-9 req/s); among ties the larger of the two prefill-stage limits'
    minimum (Θ_prfaas/p, Θ_pd-p/(1-p)), i.e. the most prefill headroom; first wins on full ties."""
    a = c.theta_prfaas / c.offload_fraction if c.offload_fraction > 0 else math.inf
    b = c.theta_pd_p / (1 - c.offload_fraction) if c.offload_fraction < 1 else math.inf
    return (round(c.lambda_max, 9), min(a, b))


def optimize(dist: LengthDist, fleet: Fleet, n_pd_total: int, grid=None) -> Capacity:
    """2-D exhaustive search over t and the split N_p + N_d = n_pd_total (PrfaaS size fixed)."""
    if int(n_pd_total) < 1:
        raise ValueError(f"n_pd_total must be >= 1, got {n_pd_total}")
    return max(sweep_split(dist, fleet, n_pd_total, grid), key=_rank)


def sweep_split(dist: LengthDist, fleet: Fleet, n_pd_total: int, grid=None) -> list[Capacity]:
    """Best-threshold capacity for each N_p in 0..n_pd_total (N_d = the rest)."""
    if int(n_pd_total) < 1:
        raise ValueError(f"n_pd_total must be >= 1, got {n_pd_total}")
    out = []
    for n_p in range(int(n_pd_total) + 1):
        f = replace(fleet, n_p=n_p, n_d=int(n_pd_total) - n_p)
        if f.n_prfaas == 0 and n_p == 0:
            out.append(evaluate(dist, f, None))  # nothing prefills: Λ = 0
        else:
            out.append(best_threshold(dist, f, grid))
    return out


def split_at_threshold(
    dist: LengthDist, fleet: Fleet, n_pd_total: int, threshold: float
) -> list[Capacity]:
    """Capacity for each N_p in 0..n_pd_total at a fixed threshold (Figure 5a)."""
    if int(n_pd_total) < 1:
        raise ValueError(f"n_pd_total must be >= 1, got {n_pd_total}")
    return [
        evaluate(dist, replace(fleet, n_p=n_p, n_d=int(n_pd_total) - n_p), threshold)
        for n_p in range(int(n_pd_total) + 1)
    ]


# ---- fleet egress and cost ---------------------------------------------------------------------
def fleet_egress_gbps(n_gpus: int, gpus_per_instance: int, phi_kv_gbps: float) -> float:
    """§2.3: egress of a prefill fleet, B_out ≈ (N / P) · Φ_kv(L_avg), in Gbps."""
    if n_gpus < 0 or gpus_per_instance < 1:
        raise ValueError("need n_gpus >= 0 and gpus_per_instance >= 1")
    if phi_kv_gbps < 0:
        raise ValueError("phi_kv_gbps must be >= 0")
    return n_gpus / gpus_per_instance * phi_kv_gbps


def per_cost_ratio(a: Capacity, fleet_a: Fleet, b: Capacity, fleet_b: Fleet) -> float:
    """(Λ_a / cost_a) / (Λ_b / cost_b): throughput ratio at equal cost (throughput scales
    linearly with fleet size, the paper's implicit assumption)."""
    ca, cb = fleet_a.cost_per_hour(), fleet_b.cost_per_hour()
    if ca <= 0 or cb <= 0 or b.lambda_max <= 0:
        raise ValueError("equal-cost ratio needs positive costs and a positive baseline")
    return (a.lambda_max / ca) / (b.lambda_max / cb)


def break_even_price_ratio(
    a: Capacity, fleet_a: Fleet, b: Capacity, fleet_b: Fleet, dear: str, cheap: str
) -> float:
    """Price ratio dear/cheap (per GPU-hour) at which fleets a and b give equal Λ per dollar."""
    ga, gb = fleet_a.gpus(), fleet_b.gpus()
    # Λ_a / (xa·r + ya) = Λ_b / (xb·r + yb), cost in units of the cheap GPU's price
    xa, ya, xb, yb = ga.get(dear, 0), ga.get(cheap, 0), gb.get(dear, 0), gb.get(cheap, 0)
    extra = (set(ga) | set(gb)) - {dear, cheap}
    if extra:
        raise ValueError(f"fleets use kinds other than {dear!r}/{cheap!r}: {sorted(extra)}")
    la, lb = a.lambda_max, b.lambda_max
    den = la * xb - lb * xa
    if den == 0:
        raise ValueError("price ratio does not change the comparison")
    return (lb * ya - la * yb) / den
