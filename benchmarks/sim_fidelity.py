"""Simulator fidelity against the live system: one short trace replayed through ``prfaas up`` (tiny
model on CPU, the packaged local deployment, the gateway's default scheduler) with ``prfaas bench``,
and through the simulator with the same deployment (``sim.from_deploy``: nodes, links, chunk, MLA
layers, slots), the same policy (``scheduling.live.make_live_fleet_policy``, as the gateway builds it)
and a profile measured on this machine right before (``prfaas profile``); TTFT percentiles side by side.

    python benchmarks/sim_fidelity.py [--requests 40] [--rate 0.5]

Writes benchmarks/results/sim_fidelity_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
            f.write(
                json.dumps(
                    {
                        "timestamp": int(1000 * t[i]),
                        "input_length": int(lens[i]),
                        "output_length": int(outs[i]),
                        "hash_ids": ids,
                    }
                )
                + "\n"
            )


def simulate(cfg_path: Path, trace: Path) -> dict:
    from prfaas.scheduling.live import default_prior, deployment_topology, make_live_fleet_policy
    from prfaas.scheduling.profile import load_profiles
    from prfaas.server.config import load_deploy_config
    from prfaas.sim.engine import Simulator
    from prfaas.sim.from_deploy import deployment_from_config
    from prfaas.sim.metrics import pct
    from prfaas.sim.workloads import load_mooncake

    cfg = load_deploy_config(cfg_path)
    prof = next(iter(load_profiles(cfg.profile_path()).values()))
    lim = cfg.engine_limits()
    r = cfg.router
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
    d = pct(res.ttft * 1000)
    return {
        "ttft_ms": d,
        "offload_fraction": float(res.offloaded.mean()),
        "threshold": pol.threshold,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="prfaas-fid-"))
    trace = d / "trace.jsonl"
    make_trace(trace, args.requests, args.rate, args.seed)
    py = sys.executable
    t0 = time.monotonic()
    subprocess.run(
        [py, "-m", "prfaas.cli", "profile", "--model", "tiny", "--device", "cpu"]
        + ["--lengths", "64", "512", "1800", "--batches", "1", "4", "16"]
        + ["--ctx", "256", "--steps", "2", "--chunk", "512", "--name", "tiny-cpu-now"]
        + ["--out", str(d / "profile.yaml")],
        check=True,
        cwd=ROOT,
    )
    profile_s = time.monotonic() - t0
    cfg = yaml.safe_load((ROOT / "prfaas" / "configs" / "deploy_local.yaml").read_text())
    cfg["router"]["profile"] = str(d / "profile.yaml")
    cfg["router"]["rebalance"] = False  # 2 PD nodes: nothing to switch
    (d / "deploy.yaml").write_text(yaml.safe_dump(cfg))
    ready = d / "gw.json"
    log = open(d / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [py, "-m", "prfaas.cli", "up", "--config", str(d / "deploy.yaml"), "--port", "0"]
        + ["--ready-file", str(ready), "--log-dir", str(d / "logs")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        while not ready.exists():
            if proc.poll() is not None:
                print((d / "up.log").read_text())
                return 1
            time.sleep(0.2)
        url = json.loads(ready.read_text())["url"]
        out = subprocess.run(
            [py, "-m", "prfaas.cli", "bench", "--url", url, "--trace", str(trace)]
            + ["--ignore-eos", "ignore_eos", "--json", "--no-progress", "--request-timeout", "600"],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        live = json.loads(out.stdout)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    sim = simulate(d / "deploy.yaml", trace)
    prof = yaml.safe_load((d / "profile.yaml").read_text())
    lt = live["ttft_ms"]
    cmd = "python benchmarks/sim_fidelity.py " + " ".join(sys.argv[1:])
    data = {
        "machine": cpu_model(),
        "command": cmd.strip(),
        "requests": args.requests,
        "rate": args.rate,
        "profile": prof,
        "profile_measure_s": profile_s,
        "live": live,
        "sim": sim,
    }
    outp = Path(args.out)
    (outp / "sim_fidelity_cpu.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    st = sim["ttft_ms"]
    rows = [
        ("mean", lt["mean"], st["mean"]),
        ("P50", lt["p50"], st["p50"]),
        ("P90", lt["p90"], st["p90"]),
        ("P99", lt["p99"], st["p99"]),
    ]
    md = [
        "# Simulator fidelity: the same short trace through `prfaas up` and `prfaas sim` (tiny, CPU)",
        "",
        f"command: `{data['command']}`; machine: {data['machine']}, shared with other jobs (the "
        "profile was measured on it right before the replay, under the same load).",
        "",
        f"Trace: {args.requests} requests, Poisson {args.rate} req/s, prompts log-normal in [32, 1800] "
        "tokens, 8-24 output tokens, no shared prefixes. Deployment: `deploy_local.yaml` (1 PrfaaS "
        "node, 1 PD-P, 1 PD-D, 1 Gbps / 10 ms link), the default scheduler (planner's t, short-term "
        f"search), rebalancing off (2 PD nodes). Simulator: t starts at {sim['threshold']:.0f}.",
        "",
        "| TTFT (ms) | live (`prfaas bench`) | simulated | error |",
        "|---|---|---|---|",
        *[f"| {k} | {a:.0f} | {b:.0f} | {100 * (b - a) / a:+.0f}% |" for k, a, b in rows],
        "",
        f"Completed live: {live['completed']} of {live.get('requests', args.requests)}; offloaded in "
        f"the simulator: {sim['offload_fraction']:.0%}.",
    ]
    (outp / "sim_fidelity_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
