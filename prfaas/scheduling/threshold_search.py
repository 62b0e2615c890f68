"""The paper's short-term scheduling: re-search the threshold t over the observed post-match lengths
when the PrfaaS egress nears saturation, the link capacity estimate moves, or a prefill queue surges
(:class:`ShortTermAdaptation`, held by :class:`~prfaas.scheduling.prfaas_policy.PrfaaSPolicy`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from prfaas.scheduling.lengths import Empirical
from prfaas.scheduling.planner import Fleet, best_threshold
from prfaas.scheduling.policy_base import role_counts
from prfaas.scheduling.types import INF, SystemState


@dataclass
class ShortTermAdaptation:
    """Paper §scheduling, short term: when PrfaaS egress utilisation nears ``util_hi``, the link
    capacity estimate moves by more than ``capacity_change``, or one prefill side's queue surges past
    ``surge_s`` seconds of backlog per instance, re-search t with the planner over the recent
    post-match length window.  ``fleet`` holds profiles and the output length; instance counts and
    link bandwidth come from the state at search time.  With ``observed_search`` the first search runs
    as soon as ``min_samples`` post-match lengths are observed, whatever the signals: the planned t
    (over the deployment's prior length law) gives way to one over the lengths actually seen."""

    fleet: Fleet
    util_hi: float = 0.8
    capacity_change: float = 0.15
    surge_s: float = 10.0
    cooldown_s: float = 10.0
    min_samples: int = 200
    grid_points: int = 256
    bandwidth_headroom: float = 0.9  # plan with this share of the estimated link capacity
    util_smoothing: float = 0.1  # EWMA weight of each new utilisation reading
    observed_search: bool = True
    util_ewma: float = 0.0
    last_search_s: float = -INF
    last_capacity: float | None = None
    searches: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.util_hi <= 1 and self.capacity_change > 0 and self.surge_s > 0):
            raise ValueError("need 0 < util_hi <= 1, capacity_change > 0 and surge_s > 0")
        if self.cooldown_s < 0 or self.min_samples < 2 or self.grid_points < 2:
            raise ValueError("need cooldown_s >= 0, min_samples >= 2 and grid_points >= 2")
        if not (0 < self.bandwidth_headroom <= 1 and 0 < self.util_smoothing <= 1):
            raise ValueError("need 0 < bandwidth_headroom <= 1 and 0 < util_smoothing <= 1")

    def link_capacity(self, state: SystemState, prfaas: str, pd: str) -> float:
        """The PrfaaS→PD link's capacity estimate (the fleet's link without a reading)."""
        link = state.links.get((prfaas, pd))
        return link.capacity_gbps if link is not None else self.fleet.link_gbps

    def step(
        self,
        now: float,
        state: SystemState,
        threshold: float | None,
        forced: bool,
        prfaas: str,
        pd: str,
    ) -> tuple[float | None, str] | None:
        """One tick: update the utilisation EWMA and, when a signal calls for it (``forced``: the
        roles changed) and the cooldown and sample count allow, re-search t.  Returns (the new t,
        why) when a search ran, else None."""
        link = state.links.get((prfaas, pd))
        cap = self.link_capacity(state, prfaas, pd)
        if self.last_capacity is None:
            self.last_capacity = cap
        if link is not None:
            self.util_ewma += self.util_smoothing * (link.utilisation - self.util_ewma)
        why = ""
        if threshold is None:
            why = "initial"
        elif self.observed_search and self.searches == 0:
            why = "observed lengths"
        elif forced:
            why = "roles changed"
        elif (
            self.last_capacity is not None
            and abs(cap - self.last_capacity) > self.capacity_change * self.last_capacity
        ):
            why = f"link capacity {self.last_capacity:.1f}->{cap:.1f} Gbps"
        elif self.util_ewma >= self.util_hi:
            why = f"egress utilisation {self.util_ewma:.2f}"
        else:
            f = state.clusters[prfaas].prefill
            p = state.clusters[pd].prefill
            nf, np_ = len(f.active()), len(p.active()) if p is not None else 0
            bf = f.backlog_s(now) / nf if nf else 0.0
            bp = p.backlog_s(now) / np_ if np_ else 0.0
            if max(bf, bp) > self.surge_s:
                why = f"queue surge {bf:.1f}s/{bp:.1f}s per instance"
        if (
            not why
            or now - self.last_search_s < self.cooldown_s
            or len(state.recent_uncached) < self.min_samples
        ):
            return None
        dist, fleet, grid = self.observed(state, cap, prfaas, pd)
        new = best_threshold(dist, fleet, grid).threshold
        self.last_search_s = now
        self.last_capacity = cap
        self.searches += 1
        return new, why

    def observed(
        self, state: SystemState, cap: float, prfaas: str, pd: str
    ) -> tuple[Empirical, Fleet, np.ndarray]:
        """The planner's inputs as observed now: the recent post-match lengths, the fleet at the
        current instance counts, ``bandwidth_headroom`` × the link estimate and the mean output of
        the recently finished requests (the fleet's own output length until enough have finished)."""
        samples = np.fromiter(state.recent_uncached, dtype=float)
        n_f, n_p, n_d = role_counts(state, prfaas, pd)
        outs = state.recent_output
        out_len = self.fleet.output_len
        if len(outs) >= max(2, self.min_samples // 4):
            out_len = max(float(np.mean(np.fromiter(outs, dtype=float))), 1.0)
        fleet = replace(
            self.fleet,
            n_prfaas=n_f,
            n_p=n_p,
            n_d=max(n_d, 0),
            link_gbps=max(cap * self.bandwidth_headroom, 1e-3),
            output_len=out_len,
        )
        grid = np.unique(np.quantile(samples, np.linspace(0, 1, self.grid_points)))
        return Empirical(samples), fleet, np.concatenate([[0.0], grid])
