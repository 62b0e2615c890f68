"""``prfaas sim``: run the cluster simulator on the case study or a recorded experiment."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

# as prfaas.sim.setups defines them (a test keeps them equal); the simulator loads only when the
# command runs, so --help is instant
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "case_study.yaml"
SYSTEMS = ("prfaas", "homogeneous_pd", "naive_heterogeneous")

EXPERIMENTS = ("validation", "bursty", "linkdrop", "cache", "capacity")


def _drop(s: str) -> tuple[float, float, float]:
    try:
        a, b, f = (float(x) for x in s.split(":"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--link-drop wants START:END:FRACTION, got {s!r}") from e
    if not (0 <= a < b and 0 < f <= 1):
        raise argparse.ArgumentTypeError("--link-drop needs 0 <= START < END and 0 < FRACTION <= 1")
    return a, b, f


def _threshold(s: str) -> float | str:
    if s == "planner":
        return s
    try:
        t = float(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--fixed-threshold wants tokens or 'planner', got {s!r}"
        ) from e
    if not t >= 0:
        raise argparse.ArgumentTypeError("--fixed-threshold must be >= 0")
    return t


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sim",
        help="discrete-event simulation of PrfaaS / PD deployments",
        description="Simulate the case study's systems on a workload; write a markdown report and "
        "PNG plots (and JSON with --json). --experiment runs a recorded experiment instead.",
    )
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="planner config (profiles, systems)"
    )
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}"
    )
    p.add_argument(
        "--workload",
        default="lognormal",
        help="lognormal | bursty | PATH (.jsonl Mooncake, .csv BurstGPT/Azure)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="arrival rate req/s (default: 80%% of PrfaaS Λ_max; traces: rescaled to it when given)",
    )
    p.add_argument("--requests", type=int, default=5000, help="requests for generated workloads")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="stretch trace timestamps by this factor"
    )
    p.add_argument("--link-gbps", type=float, default=None)
    p.add_argument("--link-drop", type=_drop, default=None, metavar="START:END:FRACTION")
    p.add_argument("--cache-blocks", type=int, default=0, help="prefix-cache blocks per cluster")
    p.add_argument(
        "--cache-mode", default="scarce", choices=("oblivious", "scarce", "abundant", "auto")
    )
    p.add_argument(
        "--fixed-threshold",
        type=_threshold,
        default=None,
        metavar="T",
        help="PrfaaS: route on a fixed t (tokens, or 'planner' for the planner's t) with no "
        "short-term re-search (default: the paper's whole scheduler: planner's t, re-searched on "
        "observed lengths, link and queue signals)",
    )
    p.add_argument(
        "--no-rebalance", action="store_true", help="PrfaaS: no long-term PD role rebalancing"
    )
    p.add_argument("--ttft-slo", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sim_out", help="output folder for report.md and plots")
    p.add_argument("--json", action="store_true", help="print per-system JSON summaries")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--experiment",
        choices=(*EXPERIMENTS, "all"),
        default=None,
        help="run a recorded experiment into --out",
    )
    p.set_defaults(func=run)


@contextlib.contextmanager
def _ctrl_c_stops(sim) -> Iterator[None]:  # noqa: ANN001 - a Simulator
    """While a system runs, the first Ctrl-C stops it (its partial result is kept, the systems
    after it do not run); a second one interrupts at once."""

    def on_sigint(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sim.stop()

    try:
        old = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def run(args: argparse.Namespace) -> int:
    """Ctrl-C: the systems already simulated and the one running (its partial result, marked
    ``(partial)``, the requests it finished) are written (report, plots, summary), no
    traceback; exit status 130."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("prfaas sim: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from prfaas.cli_progress import stages
    from prfaas.sim import experiments as E
    from prfaas.sim.engine import Simulator
    from prfaas.sim.metrics import SLO, summarize
    from prfaas.sim.options import SimOptions
    from prfaas.sim.report import plot_series, plot_ttft_cdf, summary_table
    from prfaas.sim.setups import load_case_study
    from prfaas.sim.workloads import bursty_poisson, load_workload, poisson_lognormal

    out = Path(args.out)
    try:
        if args.experiment:
            names = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
            for name in names:
                getattr(E, name)(out, config=args.config)
                print(f"wrote {out}/sim_{name}.md")
            return 0
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        bad = [s for s in systems if s not in SYSTEMS]
        if bad or not systems:
            raise ValueError(f"unknown systems {bad}; choose from {SYSTEMS}")
        sched = ()
        if args.link_drop:
            a, b, f = args.link_drop
            base = args.link_gbps or 100.0
            sched = ((a, base * f), (b, base))
        # the planner's sweeps over every system take 1-2 s: a bar on a terminal meanwhile
        with stages("prfaas sim", ["planning the deployments"]):
            cs = load_case_study(
                args.config,
                link_gbps=args.link_gbps,
                link_schedule=sched,
                cache_blocks=args.cache_blocks,
                cache_mode=args.cache_mode,
                adaptive=args.fixed_threshold is None,
                rebalance=not args.no_rebalance,
                fixed_threshold=args.fixed_threshold
                if isinstance(args.fixed_threshold, float)
                else None,
            )
        rate = args.rate or 0.8 * cs.setups["prfaas"].capacity.lambda_max
        if args.workload == "lognormal":
            w = poisson_lognormal(rate, args.requests, seed=args.seed)
        elif args.workload == "bursty":
            w = bursty_poisson(rate, args.requests, seed=args.seed)
        else:
            w = load_workload(args.workload)
            if args.time_scale != 1.0:
                w = w.time_scaled(args.time_scale)
            if args.rate:
                w = w.with_rate(args.rate)
        slo = SLO(ttft_s=args.ttft_slo)
        results, sums = [], []
        for name in systems:
            if name not in cs.setups:
                raise ValueError(f"system {name!r} not in {args.config}")
        for name in systems:
            s = cs.setups[name]
            opt = SimOptions(progress=not args.no_progress and sys.stderr.isatty())
            sim = Simulator(s.deployment, s.make_policy(), opt)
            print(f"prfaas sim: {name}, {len(w)} requests", file=sys.stderr, flush=True)
            with _ctrl_c_stops(sim):
                r = sim.run(w)
            r.system = f"{name} (partial)" if r.partial else name
            results.append(r)
            sums.append(summarize(r, slo) | {"partial": r.partial})
            if r.partial:
                done = ", ".join(x.system for x in results)
                print(
                    f"prfaas sim: interrupted at {r.end_s:.1f} s simulated; writing what ran "
                    f"({done})",
                    file=sys.stderr,
                )
                break
    except ValueError as e:
        print(f"prfaas sim: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    plot_series(results, out / "series.png", w.name)
    plot_ttft_cdf(results, out / "ttft_cdf.png", w.name)
    md = "\n\n".join(
        [
            f"# prfaas sim: {w.name}",
            f"{len(w)} requests, mean rate {w.rate:.3f} req/s, mean input {w.input_len.mean():.0f}, "
            f"mean output {w.output_len.mean():.0f}; link {cs.link_gbps:g} Gbps; TTFT SLO {slo.ttft_s:g} s.",
            summary_table(sums),
            "![series](series.png)\n\n![ttft](ttft_cdf.png)",
        ]
    )
    (out / "report.md").write_text(md + "\n")
    keys = (
        "completed",
        "throughput_rps",
        "ttft",
        "tpot",
        "offload_fraction",
        "egress_gbps_mean",
        "cross_cluster_bytes",
        "partial",
    )
    js = {
        s["system"]: {k: s[k] for k in keys} | {"e2e": s["e2e"], "goodput_rps": s["goodput_rps"]}
        for s in sums
    }
    (out / "summary.json").write_text(json.dumps(js, indent=1) + "\n")
    if args.json:
        print(json.dumps(js, indent=1))
    else:
        print(summary_table(sums))
        print(f"wrote {out}/report.md")
    return 130 if results and results[-1].partial else 0
