"""``prfaas plan``: the PrfaaS capacity planner (optimal threshold and node split)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="PrfaaS capacity planner (threshold t and N_p/N_d split)",
        description="Evaluate the PrfaaS throughput model (paper Eqs. 1-8) on a config; with no "
        "arguments runs the shipped case study (Table 6).",
    )
    p.add_argument("--config", help="planner config (YAML/JSON); default: the shipped case study")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--plot", metavar="DIR", help="write the Figure 5 sweeps as PNG into DIR")
    p.add_argument(
        "--link-sweep",
        action="store_true",
        help="also re-optimise over the config's link_sweep_gbps (plot into --plot DIR)",
    )
    p.add_argument("--links", help="comma-separated link bandwidths (Gbps) for --link-sweep")
    p.add_argument("--link-gbps", type=float, help="override the cross-cluster link bandwidth")
    p.add_argument("--save", metavar="PREFIX", help="also write PREFIX.json and PREFIX.md")
    p.set_defaults(func=run)


def _links(args, cfg) -> list[float]:
    if args.links:
        try:
            vals = [float(x) for x in args.links.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"--links must be comma-separated numbers, got {args.links!r}"
            ) from None
        return vals
    if not cfg.link_sweep_gbps:
        raise ValueError("config has no link_sweep_gbps; give --links")
    return list(cfg.link_sweep_gbps)


def build(args: argparse.Namespace) -> tuple[dict, str, str]:
    from prfaas.scheduling.plan_config import load_plan_config
    from prfaas.scheduling.plan_report import (
        format_extras,
        format_link_sweep,
        format_table,
        format_vs_paper,
        plot_figure5,
        plot_link_sweep,
    )
    from prfaas.scheduling.plan_study import figure5, grid_for, link_sweep, run_plan, solve

    cfg = load_plan_config(args.config)
    if args.link_gbps is not None:
        if not args.link_gbps > 0:
            raise ValueError("--link-gbps must be positive")
        cfg = cfg.with_link(args.link_gbps)
    grid = grid_for(cfg)
    result = run_plan(cfg, grid)
    text = [format_table(result), "", format_extras(result)]
    md = [
        f"# Planner: {Path(cfg.source).name}",
        "",
        f"Link {cfg.link_gbps:g} Gbps; mean uncached length {cfg.dist.mean():.0f} tokens.",
        "",
        format_table(result, markdown=True),
        "",
        format_extras(result, markdown=True),
    ]
    if cfg.paper:
        result["paper"] = cfg.paper
        md += ["", "## Model vs paper", "", format_vs_paper(result, cfg.paper)]
    if args.link_sweep:
        from tqdm import tqdm

        links = tqdm(  # a bar on a terminal (the sweep takes tens of seconds)
            _links(args, cfg), desc="link sweep", unit="link", file=sys.stderr, disable=None
        )
        rows = link_sweep(cfg, links, grid)
        result["link_sweep"] = rows
        text += ["", "Link sweep (PrfaaS-PD re-optimised per link):", format_link_sweep(rows)]
        md += ["", "## Link sweep", "", format_link_sweep(rows, markdown=True)]
        if args.plot:
            p = plot_link_sweep(rows, args.plot)
            text.append(f"wrote {p}")
    if args.plot and "prfaas" in cfg.systems:
        best = solve(cfg, cfg.systems["prfaas"], grid)
        paths = plot_figure5(figure5(cfg, best), args.plot)
        text += [f"wrote {p}" for p in paths]
    result["machine"] = (
        f"{platform.machine()} {platform.system()} python {platform.python_version()}"
    )
    return result, "\n".join(text), "\n".join(md) + "\n"


def run(args: argparse.Namespace) -> int:
    try:
        result, text, md = build(args)
    except ValueError as e:
        print(f"prfaas plan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prfaas plan: interrupted", file=sys.stderr)
        return 130
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.save + ".md").write_text(md)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0
