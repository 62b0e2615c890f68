"""Simulator fidelity against the live system: one short trace replayed through ``prfaas up`` (tiny
model on CPU, the packaged local deployment, the gateway's default scheduler) with ``prfaas bench``,
and through the simulator with the same deployment (``sim.from_deploy``: nodes, links, chunk, MLA
layers, slots) and a profile measured on this machine right before (``prfaas profile``: prefill,
decode steps and the nodes' hand-off costs, export and import); TTFT percentiles side by side.

The simulator replays the live run's routing (each request prefilled where the gateway sent it), so
the comparison is of the timing model, not of two threshold searches; the simulator's own policy
(``scheduling.live.make_live_fleet_policy``, as the gateway builds it) is reported beside it.  Three
simulator variants: the profile's prefill and decode only (what the simulator modelled before), then
with the nodes' hand-off costs and the engines' queues (prefill engine busy through its export,
decode engine importing one request at a time between steps, the first token one decode step after
admission), with the profile measured now and with the packaged one (``profile_tiny_cpu.yaml``).

The machine's load average is recorded before and after: the 2 cores are shared, and the live
figures hold only for the load they were measured under.

    python benchmarks/sim_fidelity.py --requests 12 --rate 0.05

Writes benchmarks/results/sim_fidelity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from prfaas.server.launcher import up_in_subprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "prfaas" / "configs" / "profile_tiny_cpu.yaml"


def make_trace(path: Path, n: int, rate: float, seed: int) -> None:
    """Poisson arrivals, log-normal prompts in [32, 1800] tokens (median 400), outputs 8-24, no
    shared prefixes (unique block ids)."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    t -= t[0]
    lens = np.clip(np.round(rng.lognormal(np.log(400), 0.9, n)), 32, 1800).astype(int)
    outs = rng.integers(8, 25, n)
    with path.open("w") as f:
        for i in range(n):
            ids = [i * 1000 + k for k in range(int(lens[i]) // 512)]
            rec = {
                "timestamp": int(1000 * t[i]),
                "input_length": int(lens[i]),
                "output_length": int(outs[i]),
                "hash_ids": ids,
            }
            f.write(json.dumps(rec) + "\n")


class ReplayRouting:
    """Routes request ``r`` where the live gateway sent it (``offloaded[r]``: the PrfaaS cluster),
    to the least-loaded instances there, as the gateway does."""

    name = "live-routing"
    threshold = None

    def __init__(self, offloaded: list[bool], prfaas: str, pd: str) -> None:
        self.offloaded, self.prfaas, self.pd = offloaded, prfaas, pd

    def decide(self, req, state):  # noqa: ANN001, ANN201
        from prfaas.scheduling.policy_base import pick_decode, pick_prefill
        from prfaas.scheduling.types import RouteDecision

        where = self.prfaas if self.offloaded[req.request_id] else self.pd
        i = pick_prefill(state.clusters[where], req, state.now, 0.0, 0)
        d = pick_decode(state.clusters[self.pd])
        return RouteDecision(where, i, self.pd, d, req.prompt_len, 0, reason="replay")

    def on_tick(self, now, state):  # noqa: ANN001, ANN201
        return []


def simulate(cfg_path: Path, trace: Path, profile_path: Path, policy: str, offl, handoff: bool):
    """TTFTs (ms, trace order) and offloads of the simulator on the deployment with one profile:
    ``policy`` "replay" (the live routing) or "own" (the gateway's scheduler); ``handoff`` False
    drops the profile's hand-off costs (the simulator as it was)."""
    from prfaas.scheduling.live import default_prior, deployment_topology, make_live_fleet_policy
    from prfaas.scheduling.profile import HardwareProfile, load_profiles
    from prfaas.server.config import load_deploy_config
    from prfaas.sim.engine import Simulator
    from prfaas.sim.from_deploy import deployment_from_config
    from prfaas.sim.workloads import load_mooncake

    cfg = load_deploy_config(cfg_path)
    prof = next(iter(load_profiles(profile_path).values()))
    if not handoff:
        d = prof.to_dict()
        for k in ("export_gbps", "import_gbps", "import_fixed_s"):
            d.pop(k, None)
        prof = HardwareProfile.from_dict(d)
    lim = cfg.engine_limits()
    r = cfg.router
    if policy == "replay":
        pol = ReplayRouting(offl, cfg.prfaas_cluster, cfg.pd_cluster)
    else:
        pol = make_live_fleet_policy(
            deployment_topology(cfg),
            prof,
            lim.max_num_seqs,
            r.output_len,
            cfg.prfaas_cluster,
            cfg.pd_cluster,
            threshold=r.threshold,
            prior=default_prior(lim.max_model_len),
            max_len=lim.max_model_len,
            rebalance=False,
            adaptive_opts=r.adaptive_opts,
        )
    res = Simulator(deployment_from_config(cfg, prof), pol).run(load_mooncake(trace))
    return (res.ttft * 1000).tolist(), res.offloaded.tolist()


def pcts(x: list[float]) -> dict[str, float]:
    a = np.asarray(x, float)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def measure(args: argparse.Namespace, d: Path) -> dict:
    """Profile this machine, then replay the trace through ``prfaas up``; the raw figures."""
    py = sys.executable
    load0 = os.getloadavg()
    t0 = time.monotonic()
    subprocess.run(
        [py, "-m", "prfaas.cli", "profile", "--model", "tiny", "--device", "cpu"]
        + ["--lengths", "64", "512", "1800", "--batches", "1", "4", "16"]
        + ["--ctx", "256", "--steps", "4", "--chunk", "512", "--name", "tiny-cpu-now"]
        + ["--out", str(d / "profile.yaml")],
        check=True,
        cwd=ROOT,
    )
    profile_s = time.monotonic() - t0
    cfg = yaml.safe_load((ROOT / "prfaas" / "configs" / "deploy_local.yaml").read_text())
    cfg["router"]["profile"] = str(d / "profile.yaml")
    cfg["router"]["rebalance"] = False  # 2 PD nodes: nothing to switch
    load1 = os.getloadavg()
    with up_in_subprocess(cfg, d, start_timeout_s=300, stop_timeout_s=60, cwd=ROOT) as info:
        subprocess.run(
            [py, "-m", "prfaas.cli", "bench", "--url", info["url"]]
            + ["--trace", str(d / "trace.jsonl"), "--ignore-eos", "ignore_eos", "--no-progress"]
            + ["--request-timeout", "600", "--save", str(d / "live.json")],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
    load2 = os.getloadavg()
    live = json.loads((d / "live.json").read_text())
    recs = sorted(live["per_request"], key=lambda r: r["index"])
    return {
        "profile": yaml.safe_load((d / "profile.yaml").read_text()),
        "profile_measure_s": profile_s,
        "load_avg_1_5_15": {"before_profile": load0, "before_replay": load1, "after": load2},
        "completed": sum(1 for r in recs if r["ok"]),
        "ttft_ms": [1000 * r["ttft_s"] if r["ok"] else None for r in recs],
        "offloaded": [bool(r.get("routing", {}).get("offloaded")) for r in recs],
        "input_len": [r["input_len"] for r in recs],
        "breakdown_ms": [breakdown(r.get("routing", {}).get("timings")) for r in recs],
    }


# the live request's path, from the gateway's and the nodes' stamps (one host: one clock); the
# same split as benchmarks/two_gpu.py
PARTS = (
    ("route_and_dispatch", "arrival", "p.received"),
    ("prefill_node_wait", "p.received", "p.prefill_start"),
    ("prefill", "p.prefill_start", "p.prefill_end"),
    ("export_and_wire", "p.prefill_end", "d.last_byte_at"),
    ("verify_and_deliver", "d.last_byte_at", "d.delivered_at"),
    ("import_wait", "d.delivered_at", "d.import_start"),
    ("import", "d.import_start", "d.import_end"),
    ("first_step", "d.import_end", "d.first_token"),
    ("relay_to_router", "d.first_token", "first_token_seen"),
)


def breakdown(t: dict | None) -> dict[str, float] | None:
    """Milliseconds of each part of a request's TTFT (None where stamps are missing)."""
    if not isinstance(t, dict) or any(a not in t or b not in t for _, a, b in PARTS):
        return None
    return {k: 1000 * (t[b] - t[a]) for k, a, b in PARTS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="prfaas-fid-"))
    make_trace(d / "trace.jsonl", args.requests, args.rate, args.seed)
    run = measure(args, d)
    if run["completed"] != args.requests:
        print(f"only {run['completed']} of {args.requests} completed live", file=sys.stderr)
        return 1
    offl = run["offloaded"]
    cfgp, trace = d / "deploy.yaml", d / "trace.jsonl"
    sims = {}
    for key, prof, pol, ho in (
        ("replay_profile_only", d / "profile.yaml", "replay", False),
        ("replay_handoff", d / "profile.yaml", "replay", True),
        ("replay_handoff_packaged", PACKAGED, "replay", True),
        ("own_policy_handoff", d / "profile.yaml", "own", True),
    ):
        ttft, off = simulate(cfgp, trace, prof, pol, offl, ho)
        sims[key] = {"ttft_ms": ttft, "offloaded": off, "pct": pcts(ttft)}
    live_p = pcts(run["ttft_ms"])
    cmd = "python benchmarks/sim_fidelity.py " + " ".join(sys.argv[1:])
    data = {
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "command": cmd.strip(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "requests": args.requests,
        "rate": args.rate,
        "live": {**run, "pct": live_p},
        "sim": sims,
    }
    outp = Path(args.out)
    (outp / "sim_fidelity.json").write_text(json.dumps(data, indent=1) + "\n")
    (outp / "sim_fidelity.md").write_text(report(data) + "\n")
    print(report(data))
    return 0


def report(data: dict) -> str:
    live = data["live"]
    s = data["sim"]
    la = live["load_avg_1_5_15"]
    prof = next(iter(live["profile"]["profiles"].values()))
    cols = [
        ("replay_profile_only", "sim: prefill + decode only (before)"),
        ("replay_handoff", "sim: + hand-off costs, engine queues (now)"),
        ("replay_handoff_packaged", "same, packaged profile"),
    ]
    hdr = "| TTFT (ms) | live (`prfaas bench`) | " + " | ".join(c for _, c in cols) + " |"
    rows = [hdr, "|---" * (2 + len(cols)) + "|"]
    for k, name in (("mean", "mean"), ("p50", "P50"), ("p90", "P90"), ("p99", "P99")):
        a = live["pct"][k]
        cells = [f"{s[c]['pct'][k]:.0f} ({100 * (s[c]['pct'][k] - a) / a:+.0f}%)" for c, _ in cols]
        rows.append(f"| {k if k == 'mean' else name} | {a:.0f} | " + " | ".join(cells) + " |")
    per = ["| # | prompt | live route | live | before | now |", "|---|---|---|---|---|---|"]
    for i, t in enumerate(live["ttft_ms"]):
        per.append(
            f"| {i} | {live['input_len'][i]} | {'prfaas' if live['offloaded'][i] else 'pd'} | "
            f"{t:.0f} | {s['replay_profile_only']['ttft_ms'][i]:.0f} | "
            f"{s['replay_handoff']['ttft_ms'][i]:.0f} |"
        )
    bd = [b for b in live["breakdown_ms"] if b]
    parts = []
    if bd:
        parts = [
            f"Where the live TTFT goes (mean over {len(bd)} requests, ms, from the gateway's and "
            "the nodes' stamps; the simulator models prefill, export + wire, import and the first "
            "step as one decode step, and the engines' queues in front of them):",
            "",
            "| " + " | ".join(k for k, _, _ in PARTS) + " |",
            "|---" * len(PARTS) + "|",
            "| " + " | ".join(f"{np.mean([b[k] for b in bd]):.1f}" for k, _, _ in PARTS) + " |",
            "",
        ]
    own = s["own_policy_handoff"]
    ho = ", ".join(
        f"{k} {prof[k]:.4g}" for k in ("export_gbps", "import_gbps", "import_fixed_s") if k in prof
    )
    return "\n".join(
        [
            "# Simulator fidelity: one short trace through `prfaas up` and the simulator (tiny, CPU)",
            "",
            f"command: `{data['command']}`; machine: {data['machine']} ({data['cores']} cores), "
            f"shared with other jobs; {data['when']}. Load average (1/5/15 min) before the profile "
            f"{la['before_profile'][0]:.2f}/{la['before_profile'][1]:.2f}/"
            f"{la['before_profile'][2]:.2f}, before the replay {la['before_replay'][0]:.2f}, after "
            f"it {la['after'][0]:.2f}/{la['after'][1]:.2f}/{la['after'][2]:.2f}.",
            "",
            f"Trace: {data['requests']} requests, Poisson {data['rate']} req/s, prompts log-normal "
            "in [32, 1800] tokens, 8-24 output tokens, no shared prefixes. Deployment: "
            "`deploy_local.yaml` (1 PrfaaS node, 1 PD-P, 1 PD-D, 1 Gbps / 10 ms link), the default "
            "scheduler, rebalancing off (2 PD nodes). Profile measured on this machine right before "
            f"(`prfaas profile`, {live['profile_measure_s']:.0f} s): prefill 512 tokens "
            f"{1e3 * prof['prefill_s'][prof['lengths'].index(512)]:.1f} ms, decode step (batch 1) "
            f"{1e3 * prof['decode_step_s'][0]:.2f} ms, hand-off {ho}.",
            "",
            "The simulator replays the live routing (each request prefilled where the gateway sent "
            f"it: {sum(live['offloaded'])} of {len(live['offloaded'])} offloaded). TTFT: live = at "
            "the client (`prfaas bench`), simulated = arrival to the first token.",
            "",
            *rows,
            "",
            f"With its own policy (the gateway's scheduler, hand-off costs on) the simulator "
            f"offloads {sum(own['offloaded'])} of {len(own['offloaded'])} and predicts mean / P90 "
            f"{own['pct']['mean']:.0f} / {own['pct']['p90']:.0f} ms.",
            "",
            *parts,
            "Per request (ms):",
            "",
            *per,
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
