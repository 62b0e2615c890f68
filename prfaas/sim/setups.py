"""Deployments + policies of the paper's case study (from the planner's config file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from prfaas.config_file import read_mapping
from prfaas.scheduling.lengths import TruncatedLogNormal
from prfaas.scheduling.planner import Capacity, Fleet, evaluate, optimize
from prfaas.scheduling.policies import Policy, make_policy
from prfaas.scheduling.profile import profiles_from_mapping
from prfaas.sim.deployment import ClusterSpec, Deployment, LinkSpec

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "case_study.yaml"
SYSTEMS = ("prfaas", "homogeneous_pd", "naive_heterogeneous")


@dataclass(frozen=True)
class Setup:
    """One system of the case study: what to simulate, how to route, what the planner predicts."""

    name: str
    deployment: Deployment
    make_policy: Callable[[], Policy]
    fleet: Fleet
    capacity: Capacity  # planner's prediction
    paper: dict


@dataclass(frozen=True)
class CaseStudy:
    setups: dict[str, Setup]
    dist: TruncatedLogNormal
    output_len: int
    link_gbps: float


def _pd_cluster(fleet: Fleet, n_p: int, n_d: int, cache_blocks: int) -> ClusterSpec:
    return ClusterSpec(
        "pd",
        "pd",
        n_p,
        n_d,
        fleet.pd if n_p or fleet.pd.t_prefill else None,
        fleet.decode,
        cache_blocks,
    )


def load_case_study(
    path: str | Path = DEFAULT_CONFIG,
    link_gbps: float | None = None,
    link_schedule: tuple[tuple[float, float], ...] = (),
    cache_blocks: int = 0,
    cache_mode: str = "scarce",
    adaptive: bool = True,
    rebalance: bool = True,
    fixed_threshold: float | None = None,
) -> CaseStudy:
    """Build the three systems; the PrfaaS t and every N_p/N_d split come from the planner.

    PrfaaS-PD runs the paper's whole scheduler by default (policies.make_policy): it starts at the
    planner's t, re-searches t on the observed post-match lengths and the link/queue signals
    (``adaptive``) and rebalances PD roles (``rebalance``).  ``fixed_threshold`` routes on that t
    with no short-term search; ``adaptive=False`` keeps the planner's t fixed."""
    cfg = read_mapping(path, "case study")
    prof = profiles_from_mapping(cfg)
    wl = cfg.get("workload", {})
    ln = wl.get("length", {})
    if ln.get("kind", "lognormal") != "lognormal":
        raise ValueError("the simulator's case study needs a lognormal workload length")
    dist = TruncatedLogNormal(ln["mu"], ln["sigma"], ln["lo"], ln["hi"])
    out_len = int(wl.get("output_len", 1024))
    gbps = float(link_gbps if link_gbps is not None else cfg.get("link_gbps", 100))
    step = float(cfg.get("threshold_step", 64))
    grid = np.arange(0.0, float(ln["hi"]) + step, step)
    paper = cfg.get("paper", {})
    setups: dict[str, Setup] = {}
    for name in SYSTEMS:
        sc = cfg.get("systems", {}).get(name)
        if sc is None:
            continue
        pf = sc.get("prfaas")
        pdc = sc["pd"]
        dec = prof[sc["decode"]]
        pd_prof = prof[pdc["profile"]]
        n_f = int(pf["instances"]) if pf else 0
        fleet = Fleet(prof[pf["profile"]] if pf else None, pd_prof, dec, n_f, 0, 0, gbps, out_len)
        n_total = int(pdc["instances"])
        if name == "naive_heterogeneous":
            n_d = int(sc.get("decode_instances", n_total))
            fleet = replace(fleet, n_p=0, n_d=n_d)
            cap = evaluate(dist, fleet, None)
        else:
            cap = optimize(dist, fleet, n_total, grid)
            fleet = replace(fleet, n_p=cap.n_p, n_d=cap.n_d)
        clusters = []
        links: tuple[LinkSpec, ...] = ()
        if n_f:
            clusters.append(
                ClusterSpec("prfaas", "prfaas", n_f, 0, fleet.prfaas, None, cache_blocks)
            )
            links = (
                LinkSpec("prfaas", "pd", gbps, link_schedule),
                LinkSpec("pd", "prfaas", gbps, link_schedule),
            )
        pd_pre = pd_prof if fleet.n_p > 0 or rebalance else None
        clusters.append(ClusterSpec("pd", "pd", fleet.n_p, fleet.n_d, pd_pre, dec, cache_blocks))
        dep = Deployment(tuple(clusters), links)
        if name == "homogeneous_pd":
            mk = partial(make_policy, "homogeneous")
        elif name == "naive_heterogeneous":
            mk = partial(make_policy, "naive")
        else:
            fixed = fixed_threshold is not None
            t = float(fixed_threshold) if fixed else cap.threshold

            def mk(t=t, fleet=fleet, ad=adaptive and not fixed) -> Policy:
                return make_policy(
                    "prfaas",
                    t,
                    fleet=fleet,
                    prior=dist,
                    adaptive=ad,
                    rebalance=rebalance,
                    cache_mode=cache_mode,
                )

        setups[name] = Setup(name, dep, mk, fleet, cap, dict(paper.get(name, {})))
    if not setups:
        raise ValueError(f"{path}: no systems to simulate")
    return CaseStudy(setups, dist, out_len, gbps)
