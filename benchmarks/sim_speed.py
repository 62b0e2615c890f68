"""Simulator speed: N requests through a ~1,000-instance PrfaaS-PD fleet (the case study × k).

Usage: python benchmarks/sim_speed.py [--requests 1000000] [--scale 62.5] [--out benchmarks/results]
Writes sim_speed.json / sim_speed.md (requests simulated per second, wall time, machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prfaas.sim.deployment import ClusterSpec, Deployment, LinkSpec
from prfaas.sim.engine import Simulator
from prfaas.sim.experiments.common import machine
from prfaas.sim.metrics import summarize
from prfaas.sim.options import SimOptions
from prfaas.sim.setups import load_case_study
from prfaas.sim.workloads import poisson_lognormal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument(
        "--scale",
        type=float,
        default=1000 / 12,
        help="case-study fleet multiplier (1000/12: 1,000 instances)",
    )
    ap.add_argument(
        "--load", type=float, default=0.8, help="arrival rate as a share of the planner's Λ_max"
    )
    ap.add_argument("--cache-blocks", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    cs = load_case_study()
    s = cs.setups["prfaas"]
    k = a.scale
    n_f, n_p = round(4 * k), round(3 * k)
    n_d = round(12 * k) - n_f - n_p
    f = s.fleet
    dep = Deployment(
        (
            ClusterSpec("prfaas", "prfaas", n_f, 0, f.prfaas, None, a.cache_blocks),
            ClusterSpec("pd", "pd", n_p, n_d, f.pd, f.decode, a.cache_blocks),
        ),
        (LinkSpec("prfaas", "pd", 100 * k), LinkSpec("pd", "prfaas", 100 * k)),
    )
    rate = a.load * s.capacity.lambda_max * k
    t0 = time.perf_counter()
    w = poisson_lognormal(rate, a.requests, seed=0)
    gen_s = time.perf_counter() - t0
    res = Simulator(dep, s.make_policy(), SimOptions(progress=a.progress)).run(w)
    sm = summarize(res)
    data = {
        "machine": machine(),
        "instances": n_f + n_p + n_d,
        "n_prfaas": n_f,
        "n_p": n_p,
        "n_d": n_d,
        "requests": a.requests,
        "rate_rps": rate,
        "simulated_s": res.end_s,
        "workload_gen_s": gen_s,
        "sim_wall_s": res.wall_s,
        "requests_per_s": a.requests / res.wall_s,
        "completed": sm["completed"],
        "ttft": sm["ttft"],
        "offload_fraction": sm["offload_fraction"],
        "egress_gbps_mean": sm["egress_gbps_mean"],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_speed.json").write_text(json.dumps(data, indent=1) + "\n")
    md = (
        "# Simulator speed\n\n"
        f"Machine: {data['machine']}. Command: `python benchmarks/sim_speed.py --requests {a.requests} --scale {k:.4g}`.\n\n"
        "| instances (PrfaaS/PD-P/PD-D) | requests | simulated time | wall (sim) | requests/s | completed |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"| {n_f + n_p + n_d} ({n_f}/{n_p}/{n_d}) | {a.requests:,} | {res.end_s:,.0f} s | {res.wall_s:.1f} s "
        f"| {data['requests_per_s']:,.0f} | {sm['completed']:,} |\n\n"
        f"Poisson {rate:.1f} req/s ({a.load:.0%} of the scaled planner Λ_max), paper lengths, fixed t = "
        f"{s.capacity.threshold:.0f}; workload generation took {gen_s:.1f} s more. Decode is analytic "
        "(a slot held for output_len × step time).\n"
    )
    (out / "sim_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
