"""The capacity experiment (:func:`capacity`): on the Mooncake trace (time-scaled, burst shape
kept), the highest mean rate (req/s) each system sustains with a share of the requests inside the
SLO (:func:`highest_rate_in_slo` over :func:`slo_share`); writes ``sim_capacity.{json,md}``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prfaas.scheduling.policies import make_policy
from prfaas.sim.engine import Simulator
from prfaas.sim.experiments.common import DEFAULT_TRACE, LABEL, machine, write_results
from prfaas.sim.metrics import SLO, summarize
from prfaas.sim.report import md_table
from prfaas.sim.setups import DEFAULT_CONFIG, load_case_study
from prfaas.sim.workloads import load_mooncake


def slo_share(r, slo: SLO) -> float:
    """Share of all requests that completed inside the SLO (TTFT and TPOT)."""
    ok = np.isfinite(r.done) & (r.ttft <= slo.ttft_s) & (r.tpot <= slo.tpot_s * (1 + 1e-9))
    return float(ok.mean())


def highest_rate_in_slo(
    run_at, share: float = 0.9, lo: float = 0.25, factor: float = 1.25, steps: int = 6
) -> tuple[float, list[tuple[float, float]]]:
    """Highest mean rate whose run keeps ``share`` of the requests inside the SLO: a geometric scan up
    from ``lo`` (by ``factor``) until two rates in a row fail, then ``steps`` bisections between the
    last rate that passed and the next one.  ``run_at(rate)`` returns the share at that rate."""
    probes: list[tuple[float, float]] = []
    rate, best, fails = lo, 0.0, 0
    fail_at = None
    while fails < 2 and rate < 1e4:
        s = run_at(rate)
        probes.append((rate, s))
        if s >= share:
            best, fails, fail_at = rate, 0, None
        else:
            fails += 1
            fail_at = rate if fail_at is None else fail_at
        rate *= factor
    if best == 0.0:
        return 0.0, probes
    a, b = best, fail_at if fail_at is not None else best * factor
    for _ in range(steps):
        m = 0.5 * (a + b)
        s = run_at(m)
        probes.append((m, s))
        a, b = (m, b) if s >= share else (a, m)
    return a, probes


def capacity(
    out: Path,
    config=DEFAULT_CONFIG,
    trace: Path = DEFAULT_TRACE,
    cache_blocks: int = 40000,
    share: float = 0.9,
    ttft_slo_s: float = 10.0,
) -> dict:
    """Capacity sweep on the Mooncake trace: the highest mean rate (the trace's requests and burst
    shape, time-scaled) each system sustains with >= ``share`` of the requests inside the SLO."""
    if not trace.is_file():
        raise ValueError(f"no trace at {trace}")
    w = load_mooncake(trace)
    slo = SLO(ttft_s=ttft_slo_s)
    cs = load_case_study(config, cache_blocks=cache_blocks)
    sp = cs.setups["prfaas"]
    systems = [
        ("PrfaaS-PD (whole scheduler)", sp.deployment, sp.make_policy),
        (
            "PrfaaS-PD, no rebalancing",
            sp.deployment,
            lambda: make_policy("prfaas", sp.capacity.threshold, fleet=sp.fleet, adaptive=True),
        ),
        (
            "PrfaaS-PD fixed t (case study)",
            sp.deployment,
            lambda: make_policy("prfaas", sp.capacity.threshold),
        ),
        (LABEL["homogeneous_pd"], *_dm(cs, "homogeneous_pd")),
        (LABEL["naive_heterogeneous"], *_dm(cs, "naive_heterogeneous")),
    ]
    data = {
        "machine": machine(),
        "trace": str(trace),
        "requests": len(w),
        "trace_rate": w.rate,
        "share": share,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "cache_blocks": cache_blocks,
        "systems": {},
    }
    rows = []
    for label, dep, mk in systems:

        def run_at(rate: float, dep=dep, mk=mk) -> float:
            return slo_share(Simulator(dep, mk()).run(w.with_rate(rate)), slo)

        best, probes = highest_rate_in_slo(run_at, share)
        r = Simulator(dep, mk()).run(w.with_rate(best)) if best > 0 else None
        sm = summarize(r, slo) if r is not None else None
        data["systems"][label] = {"rate": best, "probes": probes, "summary_at_rate": sm}
        rows.append(
            [
                label,
                best,
                sm["ttft"]["mean"] if sm else float("nan"),
                sm["ttft"]["p90"] if sm else float("nan"),
                sm["offload_fraction"] if sm else float("nan"),
                len(probes),
            ]
        )
    base = data["systems"][LABEL["homogeneous_pd"]]["rate"]
    for row in rows:
        row.insert(2, f"{row[1] / base:.2f}×" if base else "—")
    md = "\n\n".join(
        [
            "# Capacity on the Mooncake trace: highest rate with >= 90% of requests inside the SLO",
            f"Machine: {data['machine']}. Command: `prfaas sim --experiment capacity`. Trace "
            f"`{trace.name}` ({len(w)} requests, mean input {w.input_len.mean():.0f}, mean output "
            f"{w.output_len.mean():.0f}, own rate {w.rate:.2f} req/s), time-scaled to each rate "
            "(burst shape kept); case-study deployments (PrfaaS-PD 4/3/5, homogeneous 9/3, naive "
            f"4/8 instances), prefix caches of {cache_blocks} blocks per cluster. SLO: TTFT ≤ "
            f"{slo.ttft_s:g} s and TPOT ≤ {1000 * slo.tpot_s:g} ms; a rate passes when ≥ "
            f"{share:.0%} of all requests complete inside it. Search: geometric scan ×1.25 from "
            "0.25 req/s until two rates in a row fail, then 6 bisections.",
            md_table(
                [
                    "system",
                    "highest rate (req/s)",
                    "vs homogeneous",
                    "TTFT mean at it",
                    "TTFT P90",
                    "offload",
                    "runs",
                ],
                rows,
            ),
        ]
    )
    write_results(out, "sim_capacity", data, md)
    return data


def _dm(cs, name: str):
    s = cs.setups[name]
    return s.deployment, s.make_policy
