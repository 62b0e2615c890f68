"""The link-drop experiment (:func:`linkdrop`): the PrfaaS→PD link falls to a share of its
bandwidth for a while; fixed t vs adaptive t vs the whole scheduler, over the run and over the
arrivals of the drop window (:func:`summarize_window`); writes ``sim_linkdrop.{json,md,png}``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prfaas.scheduling.policies import make_policy
from prfaas.sim.engine import Simulator
from prfaas.sim.experiments.common import machine, write_results
from prfaas.sim.metrics import SLO, summarize
from prfaas.sim.report import md_table, plot_series
from prfaas.sim.setups import DEFAULT_CONFIG, load_case_study
from prfaas.sim.workloads import poisson_lognormal


def linkdrop(
    out: Path,
    config=DEFAULT_CONFIG,
    link_gbps: float = 25.0,
    drop: tuple[float, float, float] = (900.0, 1200.0, 0.2),
    load: float = 0.5,
    n_s: float = 2400.0,
    seed: int = 0,
) -> dict:
    """The PrfaaS→PD link drops to 20% of its bandwidth for 5 minutes: fixed t vs adaptive t."""
    t0, t1, frac = drop
    sched = ((t0, link_gbps * frac), (t1, link_gbps))
    cs = load_case_study(config, link_gbps=link_gbps, link_schedule=sched)
    s = cs.setups["prfaas"]
    rate = load * s.capacity.lambda_max
    w = poisson_lognormal(rate, int(rate * n_s), seed=seed)
    slo = SLO(ttft_s=10.0)
    pols = {
        "fixed t": make_policy("prfaas", s.capacity.threshold, name="prfaas-fixed"),
        "adaptive t, no rebalancing": make_policy(
            "prfaas", s.capacity.threshold, fleet=s.fleet, adaptive=True, name="prfaas-adaptive"
        ),
        "whole scheduler (default)": s.make_policy(),
    }
    data = {"machine": machine(), "rate": rate, "link_gbps": link_gbps, "drop": drop, "systems": {}}
    results, rows = [], []
    for label, pol in pols.items():
        r = Simulator(s.deployment, pol).run(w)
        sm = summarize(r, slo)
        m = (r.arrival >= t0) & (r.arrival < t1 + 300)
        during = summarize_window(r, m, slo)
        data["systems"][label] = {
            "summary": sm,
            "drop_window": during,
            "thresholds": pol.history[:200],
        }
        results.append(r)
        rows.append(
            [
                label,
                sm["throughput_rps"],
                sm["goodput_rps"],
                sm["ttft"]["mean"],
                sm["ttft"]["p90"],
                during["goodput_share"],
                during["ttft_p90"],
                sm["offload_fraction"],
                len(pol.history),
            ]
        )
    plot_series(
        results,
        out / "sim_linkdrop.png",
        f"link {link_gbps:g} Gbps → {link_gbps * frac:g} Gbps at {t0:.0f}-{t1:.0f} s",
    )
    md = "\n\n".join(
        [
            "# Link drop: the whole scheduler vs adaptive t vs fixed t",
            f"Machine: {data['machine']}. Command: `prfaas sim --experiment linkdrop`. Case-study PrfaaS-PD "
            f"(4 / {s.capacity.n_p} / {s.capacity.n_d}), PrfaaS→PD link {link_gbps:g} Gbps dropping to "
            f"{frac:.0%} between {t0:.0f} s and {t1:.0f} s; Poisson {rate:.2f} req/s ({load:.0%} of Λ_max), "
            f"planner t = {s.capacity.threshold:.0f}. Goodput SLO: TTFT ≤ {slo.ttft_s:g} s, TPOT ≤ 25 ms. "
            "The adaptive policy sees only the link monitor (throughput, busy time) and re-searches t "
            "with the planner over the recent post-match lengths when the capacity estimate moves.",
            md_table(
                [
                    "policy",
                    "thr (req/s)",
                    "goodput (req/s)",
                    "TTFT mean",
                    "TTFT P90",
                    "in SLO (drop+5min arrivals)",
                    "TTFT P90 (drop+5min)",
                    "offload",
                    "t changes",
                ],
                rows,
            ),
            "![linkdrop](sim_linkdrop.png)",
        ]
    )
    write_results(out, "sim_linkdrop", data, md)
    return data


def summarize_window(r, mask: np.ndarray, slo: SLO) -> dict:
    ttft = r.ttft[mask]
    ok = np.isfinite(ttft) & (ttft <= slo.ttft_s) & (r.tpot[mask] <= slo.tpot_s * (1 + 1e-9))
    f = ttft[np.isfinite(ttft)]
    return {
        "requests": int(mask.sum()),
        "goodput_share": float(ok.mean()) if mask.any() else float("nan"),
        "ttft_mean": float(f.mean()) if f.size else float("nan"),
        "ttft_p90": float(np.percentile(f, 90)) if f.size else float("nan"),
    }
