"""The cache-routing experiment (:func:`cache`): cache-aware (scarce / abundant / auto) vs
cache-oblivious routing on the Mooncake trace, at two thresholds and under the whole scheduler;
cross-cluster bytes, egress (Gbit/s), TTFT (s), hit rates; writes ``sim_cache.{json,md,png}``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from prfaas.scheduling.lengths import Empirical, uncached_lengths
from prfaas.scheduling.planner import best_threshold
from prfaas.scheduling.policies import Policy, make_policy
from prfaas.sim.engine import Simulator
from prfaas.sim.experiments.common import DEFAULT_TRACE, machine, write_results
from prfaas.sim.metrics import summarize
from prfaas.sim.report import md_table, plot_bars
from prfaas.sim.setups import DEFAULT_CONFIG, load_case_study
from prfaas.sim.workloads import load_mooncake

CACHE_ROUTING = ("oblivious", "scarce", "abundant", "auto")


def full_policy(cs, cache_mode: str) -> Policy:
    """The case study's PrfaaS-PD whole scheduler with another cache-routing mode."""
    s = cs.setups["prfaas"]
    return make_policy(
        "prfaas",
        s.capacity.threshold,
        fleet=s.fleet,
        prior=cs.dist,
        adaptive=True,
        rebalance=True,
        cache_mode=cache_mode,
    )


def cache(
    out: Path,
    config=DEFAULT_CONFIG,
    trace: Path = DEFAULT_TRACE,
    cache_blocks: int = 20000,
    time_scale: float = 1.0,
    link_gbps: float = 100.0,
) -> dict:
    """Cache-aware (scarce / abundant / auto) vs cache-oblivious routing on the Mooncake trace."""
    w = load_mooncake(trace).time_scaled(time_scale)
    cs = load_case_study(config, cache_blocks=cache_blocks, link_gbps=link_gbps)
    s = cs.setups["prfaas"]

    recs = [
        {"input_length": int(a), "hash_ids": h}
        for a, h in zip(w.input_len, w.hash_ids, strict=True)
    ]
    emp = Empirical(uncached_lengths(recs))
    fleet = replace(s.fleet, output_len=float(w.output_len.mean()))
    t_trace = best_threshold(emp, fleet, np.arange(0, 131072, 64)).threshold
    t_case = s.capacity.threshold
    data = {
        "machine": machine(),
        "cache_blocks": cache_blocks,
        "thresholds": {"trace": t_trace, "case": t_case},
        "modes": {},
    }
    rows = []
    full = load_case_study(config, cache_blocks=cache_blocks, link_gbps=link_gbps)
    runs = [(mode, t, f"{t:.0f}") for t in (t_trace, t_case) for mode in CACHE_ROUTING]
    runs += [(mode, None, "whole scheduler") for mode in ("scarce", "auto")]
    for mode, t, tl in runs:
        if t is None:
            pol = full_policy(full, mode)
            key = f"{mode} whole scheduler"
        else:
            pol = make_policy("prfaas", t, cache_mode=mode, name=f"prfaas-{mode}")
            key = f"{mode} t={t:.0f}"
        r = Simulator(s.deployment, pol).run(w)
        sm = summarize(r)
        data["modes"][key] = sm
        rows.append(
            [
                f"{mode}",
                tl,
                sm["cross_cluster_bytes"] / 1e9,
                sm["egress_gbps_mean"],
                sm["ttft"]["mean"],
                sm["ttft"]["p90"],
                sm["ttft"]["p99"],
                sm["offload_fraction"],
                sm["cache_hit_rate"]["prfaas"],
                sm["cache_hit_rate"]["pd"],
                sm["throughput_rps"],
            ]
        )
    plot_bars(
        [k.replace(" ", "\n") for k in data["modes"]],
        {
            "cross-cluster GB": [m["cross_cluster_bytes"] / 1e9 for m in data["modes"].values()],
            "TTFT mean (s) ×100": [100 * m["ttft"]["mean"] for m in data["modes"].values()],
            "TTFT P90 (s) ×100": [100 * m["ttft"]["p90"] for m in data["modes"].values()],
        },
        "value",
        out / "sim_cache.png",
        "Mooncake trace: cache-aware vs cache-oblivious routing",
    )
    md = "\n\n".join(
        [
            "# Cache-aware vs cache-oblivious routing (Mooncake trace)",
            f"Machine: {data['machine']}. Command: `prfaas sim --experiment cache`. Case-study PrfaaS-PD "
            f"deployment, prefix cache of {cache_blocks} blocks (512 tokens) per cluster with LRU, trace "
            f"at {'its own' if time_scale == 1 else f'{time_scale:g}×'} timing; two thresholds: t = {t_trace:.0f} (the "
            f"planner's best over the trace's post-match lengths, output mean {w.output_len.mean():.0f}) and t = {t_case:.0f} "
            "(the case study's). Hit rates count reused tokens (own cache or copied) over prompt tokens "
            "of the requests each cluster prefilled. oblivious: route on the prompt length; "
            "scarce: on l_total − l_pd; abundant: on l_total − max(l_prfaas, l_pd) and copy the longer "
            "prefix across; auto: abundant while link utilisation < 50%. The last two rows run the "
            "whole scheduler (default: t re-searched on the observed post-match lengths and "
            "link/queue signals, PD role rebalancing).",
            md_table(
                [
                    "routing",
                    "t",
                    "cross-cluster GB",
                    "egress Gbps",
                    "TTFT mean",
                    "P90",
                    "P99",
                    "offload",
                    "hit prfaas",
                    "hit pd",
                    "thr (req/s)",
                ],
                rows,
            ),
            "![cache](sim_cache.png)",
        ]
    )
    write_results(out, "sim_cache", data, md)
    return data
