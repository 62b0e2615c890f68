"""Run a planner config: optimal systems, equal-cost comparison, fleet egress, sweeps."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from prfaas.scheduling.plan_config import PlanConfig, SystemSpec
from prfaas.scheduling.planner import (
    Capacity,
    best_threshold,
    break_even_price_ratio,
    default_grid,
    evaluate,
    fleet_egress_gbps,
    optimize,
    per_cost_ratio,
    split_at_threshold,
)

KEYS = (
    "threshold",
    "n_prfaas",
    "n_p",
    "n_d",
    "theta_prfaas",
    "theta_pd_p",
    "theta_pd_d",
    "lambda_max",
    "offload_fraction",
    "egress_gbps",
)


def grid_for(cfg: PlanConfig) -> np.ndarray:
    return default_grid(cfg.dist, cfg.threshold_step)


def solve(cfg: PlanConfig, spec: SystemSpec, grid: np.ndarray | None = None) -> Capacity:
    """Best capacity of one system: t searched, and the split too where ``n_pd_total`` is set."""
    g = grid_for(cfg) if grid is None else grid
    if spec.n_pd_total is None:
        return best_threshold(cfg.dist, spec.fleet, g)
    return optimize(cfg.dist, spec.fleet, spec.n_pd_total, g)


def _row(c: Capacity, base: float | None) -> dict:
    d = {k: getattr(c, k) for k in KEYS}
    d.update(l_long=c.l_long, l_short=c.l_short, bound=c.bound)
    d["prfaas_bandwidth_bound"] = c.prfaas_bandwidth_bound
    d["ratio"] = c.lambda_max / base if base else None
    return d


def fleet_of(spec: SystemSpec, c: Capacity):
    return replace(spec.fleet, n_p=c.n_p, n_d=c.n_d)


def run_plan(cfg: PlanConfig, grid: np.ndarray | None = None) -> dict:
    """``{"systems": {name: {...}}, "equal_cost": ..., "fleet_egress": ...}`` for a config."""
    g = grid_for(cfg) if grid is None else grid
    caps = {name: solve(cfg, spec, g) for name, spec in cfg.systems.items()}
    base = caps.get("homogeneous_pd")
    base_lam = base.lambda_max if base else None
    out: dict = {
        "config": cfg.source,
        "link_gbps": cfg.link_gbps,
        "mean_length": cfg.dist.mean(),
        "systems": {k: _row(c, base_lam) for k, c in caps.items()},
    }
    if base is not None:
        out["equal_cost"] = equal_cost(cfg, caps)
    if cfg.fleet_egress:
        out["fleet_egress"] = fleet_egress_table(cfg.fleet_egress)
    return out


def equal_cost(cfg: PlanConfig, caps: dict[str, Capacity]) -> dict:
    """Λ per unit GPU cost relative to homogeneous PD, and the break-even price ratio."""
    base_spec, base = cfg.systems["homogeneous_pd"], caps["homogeneous_pd"]
    base_fleet = fleet_of(base_spec, base)
    out: dict = {}
    for name, c in caps.items():
        if name == "homogeneous_pd":
            continue
        f = fleet_of(cfg.systems[name], c)
        entry: dict = {"gpus": f.gpus(), "baseline_gpus": base_fleet.gpus()}
        try:
            entry["cost_per_hour"] = f.cost_per_hour()
            entry["baseline_cost_per_hour"] = base_fleet.cost_per_hour()
            entry["ratio_at_equal_cost"] = per_cost_ratio(c, f, base, base_fleet)
        except ValueError as e:
            entry["error"] = str(e)
        kinds = sorted(set(f.gpus()) | set(base_fleet.gpus()))
        if len(kinds) == 2 and f.prfaas is not None:
            dear = f.prfaas.name
            cheap = next(k for k in kinds if k != dear)
            try:
                entry["break_even_price_ratio"] = break_even_price_ratio(
                    c, f, base, base_fleet, dear, cheap
                )
                entry["price_ratio"] = f"{dear}/{cheap}"
            except ValueError as e:
                entry["error"] = str(e)
        out[name] = entry
    return out


def fleet_egress_table(spec: dict) -> dict:
    """§2.3 egress of ``n_gpus`` GPUs at ``l_avg`` per model (Φ_kv interpolated in log length)."""
    try:
        n, per, l_avg = int(spec["n_gpus"]), int(spec["gpus_per_instance"]), float(spec["l_avg"])
        lengths, phis = spec["lengths"], spec["phi_kv_gbps"]
    except KeyError as e:
        raise ValueError(f"fleet_egress misses {e}") from None
    ll = np.log(np.asarray(lengths, float))
    rows = {}
    for model, vals in phis.items():
        if len(vals) != len(lengths):
            raise ValueError(
                f"fleet_egress: {model} has {len(vals)} values for {len(lengths)} lengths"
            )
        phi = float(np.interp(math.log(l_avg), ll, np.asarray(vals, float)))
        rows[model] = {"phi_kv_gbps": phi, "egress_gbps": fleet_egress_gbps(n, per, phi)}
    return {"n_gpus": n, "gpus_per_instance": per, "l_avg": l_avg, "models": rows}


def link_sweep(cfg: PlanConfig, links, grid: np.ndarray | None = None) -> list[dict]:
    """Optimal PrfaaS-PD (t and split) as the cross-cluster link shrinks."""
    if "prfaas" not in cfg.systems:
        raise ValueError("link sweep needs a 'prfaas' system in the config")
    g = grid_for(cfg) if grid is None else grid
    base = solve(cfg, cfg.systems["homogeneous_pd"], g) if "homogeneous_pd" in cfg.systems else None
    rows = []
    for link in links:
        if not link > 0:
            raise ValueError(f"link bandwidth must be positive, got {link}")
        c2 = cfg.with_link(link)
        c = solve(c2, c2.systems["prfaas"], g)
        row = {"link_gbps": float(link), **_row(c, base.lambda_max if base else None)}
        row["link_utilisation"] = c.egress_gbps / link
        rows.append(row)
    return rows


def figure5(cfg: PlanConfig, best: Capacity, grid: np.ndarray | None = None) -> dict:
    """Figure 5 data: (a) Λ vs N_p at the optimal t; (b) Λ vs t at the optimal split."""
    spec = cfg.systems["prfaas"]
    if spec.n_pd_total is None or best.threshold is None:
        raise ValueError("figure 5 needs a prfaas system with a searched split and a threshold")
    split = split_at_threshold(cfg.dist, spec.fleet, spec.n_pd_total, best.threshold)
    f = replace(spec.fleet, n_p=best.n_p, n_d=best.n_d)
    lo, hi = cfg.dist.support
    ts = np.linspace(max(lo, 1.0), hi, 400) if grid is None else grid
    sweep = [evaluate(cfg.dist, f, float(t)) for t in ts]

    def lim(c: Capacity) -> tuple[float, float]:
        p = c.offload_fraction
        a = c.theta_prfaas / p if p > 0 else math.inf
        b = c.theta_pd_p / (1 - p) if p < 1 else math.inf
        return a, b

    return {
        "split": {
            "threshold": best.threshold,
            "n_p": [c.n_p for c in split],
            "lambda_max": [c.lambda_max for c in split],
        },
        "threshold": {
            "n_p": best.n_p,
            "n_d": best.n_d,
            "t": [float(t) for t in ts],
            "lambda_max": [c.lambda_max for c in sweep],
            "prfaas_limit": [lim(c)[0] for c in sweep],
            "pd_p_limit": [lim(c)[1] for c in sweep],
            "pd_d_limit": [c.theta_pd_d for c in sweep],
        },
    }
