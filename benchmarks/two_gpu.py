"""Two GPUs: a PrfaaS prefill node on one device, the PD cluster (one PD-P and one PD-D node) on
another, the KVCache of offloaded requests shipped over the tcp backend through an emulated
(shaped) link; measured TTFT breakdown per request against what the simulator predicts for the
same set-up, arrivals and lengths with a profile of the same model on the same GPU.

    PYTHONPATH=$PWD python3 benchmarks/two_gpu.py --model small --device cuda \\
        --link-gbps 10 --link-ms 2 --num-requests 24 --rate 2
    python3 benchmarks/two_gpu.py --model tiny --device cpu --lengths 512 768 1024 \\
        --short-lengths 128 --num-requests 8 --rate 4   # the CPU version (tests/test_two_gpu_bench.py)

The deployment is started exactly as ``prfaas up`` starts one (``python -m prfaas.cli up``: one OS
process per node, the gateway in the launcher process), with ``--device cuda`` putting the PrfaaS node
on ``cuda:0`` and both PD nodes on ``cuda:1`` (per-node ``device`` in the deployment file). Requests
are token-id prompts sent to ``/v1/completions`` with ``stream: true`` at Poisson arrival times.

TTFT breakdown of one request, from the nodes' own ``time.time()`` stamps (``prfaas`` field of the
final chunk, ``timings``; one host, so one clock):

* queue: router arrival -> first engine step of the prefill on the prefill node (routing, opening
  the decode stream, the HTTP call, the prefill engine's waiting queue);
* prefill: that step's start -> the prefill engine's hand-off (all prompt tokens but the last);
* transfer tail: prefill end -> the decode node's receiver delivered the whole, verified KV (export
  to host memory, the send over the link, checksums);
* first decode: KV delivered -> the decode engine sampled the first token (waiting for the engine
  thread or a free slot, the import into the cache, the step that computes the last prompt token).

The four sum to the nodes' TTFT (router arrival -> first token sampled); the router's own TTFT
(arrival -> first token event read by the router) and the client's (request sent -> first SSE
chunk) are reported beside it.

The simulator (``prfaas.sim``) runs the same deployment (1 PrfaaS prefill instance, 1 PD-P, 1 PD-D
with ``bs_max`` = the engine's ``max_num_seqs``), the same fixed-threshold ``PrfaaSPolicy``, the same
link bandwidth, the measured router arrival times and the prompt lengths, with the profile
(``--profile`` or measured here first with ``prfaas profile`` on the prefill node's device), KV sent
after the prefill (``pipelined=False``: the server does not stream layers). Its predicted
components: queue = prefill start - arrival, prefill, transfer = KV in place - prefill end (+ half
the link RTT for offloaded requests: the simulated link has no latency), first decode = wait for a
slot + one decode step at the admission batch (the simulator's TTFT ends at admission).

Writes ``<out-dir>/two_gpu_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPONENTS = ("queue", "prefill", "transfer", "first_decode")
CLASSES = ("all", "offloaded", "pd")
NEEDED_MODULES = (
    "torch",
    "numpy",
    "scipy",
    "yaml",
    "httpx",
    "fastapi",
    "uvicorn",
    "prometheus_client",
)


# ---------------------------------------------------------------------------------------------
# arguments and the workload
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="small", help="model preset (small on GPU, tiny on CPU)")
    p.add_argument(
        "--device",
        default="cuda",
        help="cuda: PrfaaS node on cuda:0, PD nodes on cuda:1; cpu: every node on the CPU",
    )
    p.add_argument("--prefill-device", default=None, help="PrfaaS node's device (overrides)")
    p.add_argument("--pd-device", default=None, help="PD-P and PD-D nodes' device (overrides)")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[8192, 16384, 32768],
        help="prompt lengths of the long (offloaded) requests, drawn uniformly",
    )
    p.add_argument(
        "--short-lengths",
        type=int,
        nargs="*",
        default=[1024, 2048],
        help="prompt lengths of the short requests (prefilled in PD-P)",
    )
    p.add_argument(
        "--short-fraction", type=float, default=0.25, help="share of short requests (at least 1)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="routing threshold t in tokens (default: midway between the short and long lengths)",
    )
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request")
    p.add_argument("--link-gbps", type=float, default=10.0, help="PrfaaS -> PD link bandwidth")
    p.add_argument("--link-ms", type=float, default=2.0, help="PrfaaS -> PD link RTT in ms")
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine slots (PD-D bs_max)")
    p.add_argument(
        "--intra-gbps",
        type=float,
        default=800.0,
        help="simulator: PD-P -> PD-D transfer bandwidth (the live one is unshaped loopback TCP)",
    )
    p.add_argument("--profile", default=None, help="profile file (prfaas profile --out ...)")
    p.add_argument("--profile-name", default=None, help="which profile in the file (default: 1st)")
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps timed per batch")
    p.add_argument(
        "--profile-ctx", type=int, default=None, help="decode context (default: median length)"
    )
    p.add_argument(
        "--warmup",
        default="auto",
        choices=("auto", "full", "lengths", "none"),
        help="before measuring: full = the whole schedule once (compiles kernels, captures CUDA "
        "graphs), lengths = one request per length; auto = full on CUDA, lengths on the CPU",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="result file tag (default: MODEL_DEVICE)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--log-dir", default=None, help="node logs (default: a temp dir)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="deployment start, seconds")
    p.add_argument(
        "--run-timeout", type=float, default=300.0, help="each request schedule, seconds"
    )
    args = p.parse_args(argv)
    if args.prefill_device is None:
        args.prefill_device = "cuda:0" if args.device == "cuda" else args.device
    if args.pd_device is None:
        args.pd_device = "cuda:1" if args.device == "cuda" else args.device
    if not args.short_lengths:
        args.short_lengths = []
    if args.threshold is None:
        lo = max(args.short_lengths) if args.short_lengths else 0
        args.threshold = float((lo + min(args.lengths)) // 2)
    if args.short_lengths and max(args.short_lengths) > args.threshold:
        p.error(f"short lengths must be <= the threshold {args.threshold:g}")
    if min(args.lengths) <= args.threshold:
        p.error(f"long lengths must be > the threshold {args.threshold:g}")
    if args.num_requests < 2 or args.rate <= 0 or args.output_len < 1 or args.link_gbps <= 0:
        p.error("need --num-requests >= 2, --rate > 0, --output-len >= 1, --link-gbps > 0")
    if args.tag is None:
        args.tag = f"{args.model}_{'cuda' if 'cuda' in args.prefill_device else 'cpu'}"
    if args.warmup == "auto":
        args.warmup = "full" if "cuda" in args.prefill_device else "lengths"
    return args


def make_workload(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Requests with Poisson arrival offsets, a length each (at least one short and one long)."""
    rng = random.Random(seed)
    n = args.num_requests
    n_short = 0
    if args.short_lengths:
        n_short = min(n - 1, max(1, round(args.short_fraction * n)))
    kinds = ["short"] * n_short + ["long"] * (n - n_short)
    rng.shuffle(kinds)
    t = 0.0
    reqs = []
    for i, kind in enumerate(kinds):
        if i:
            t += rng.expovariate(args.rate)
        length = rng.choice(args.short_lengths if kind == "short" else args.lengths)
        reqs.append(
            {"index": i, "offset_s": t, "prompt_tokens": length, "seed": rng.randrange(2**31)}
        )
    return reqs


def prompt_ids(length: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    hi = min(vocab, 30000)
    return [rng.randrange(hi) for _ in range(length)]


# ---------------------------------------------------------------------------------------------
# the deployment
def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    longest = max([*args.lengths, *args.short_lengths])
    max_len = longest + args.output_len + 64
    blocks_per_seq = -(-max_len // 16)
    return {
        "max_num_seqs": args.max_num_seqs,
        # one prompt's whole prefill in one step, as `prfaas profile` times it
        "max_num_batched_tokens": max(longest, 512),
        "max_model_len": max_len,
        "block_size": 16,
        # every slot can hold a request of max_model_len: the cache is never what limits a node
        "num_blocks": args.max_num_seqs * blocks_per_seq + 16,
        # no prefix cache: every prompt is unique here, and with it a prefill is cut into
        # checkpoint_interval chunks (the profile times whole prompts)
        "enable_prefix_cache": False,
    }


def deploy_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "device": args.pd_device,
        "secret": secrets.token_hex(16),
        "transfer_backend": "tcp",
        "engine": engine_settings(args),
        "clusters": [
            {
                "name": "prfaas",
                "kind": "prfaas",
                "nodes": [{"name": "prfaas-0", "role": "prefill", "device": args.prefill_device}],
            },
            {
                "name": "pd",
                "kind": "pd",
                "nodes": [
                    {"name": "pd-p0", "role": "prefill", "device": args.pd_device},
                    {"name": "pd-d0", "role": "decode", "device": args.pd_device},
                ],
            },
        ],
        "links": [{"src": "prfaas", "dst": "pd", "gbps": args.link_gbps, "rtt_ms": args.link_ms}],
        "router": {
            "host": "127.0.0.1",
            "port": 0,
            "policy": "prfaas",
            "threshold": args.threshold,
            "cache_mode": "scarce",
            "max_inflight": 2 * args.num_requests + 8,
            "prefill_timeout_s": 300.0,
            "poll_interval_s": 0.5,
        },
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def start_deployment(
    cfg_path: Path, run_dir: Path, timeout_s: float
) -> tuple[subprocess.Popen, dict[str, Any]]:
    """``prfaas up`` as a child process; returns it and its ready file (URL, nodes)."""
    ready = run_dir / "gateway.json"
    log = run_dir / "up.log"
    cmd = [sys.executable, "-m", "prfaas.cli", "up", "--config", str(cfg_path), "--port", "0"]
    cmd += ["--ready-file", str(ready), "--log-dir", str(run_dir / "nodes")]
    with open(log, "wb") as out:
        # same process group as this script: whatever kills it (Ctrl-C, a time limit) reaches
        # `prfaas up` too, and its nodes exit when it is gone
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_deployment(proc)
            raise RuntimeError(f"prfaas up did not start:\n{logs_tail(run_dir)}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


def logs_tail(run_dir: Path) -> str:
    """The ends of the launcher's and the nodes' logs (for a failed run)."""
    paths = [run_dir / "up.log", *sorted((run_dir / "nodes").glob("*.log"))]
    return "".join(f"\n--- {p}\n{_tail(p)}" for p in paths if p.exists())


def stop_deployment(proc: subprocess.Popen) -> None:
    """Ctrl-C for ``prfaas up`` (it stops its nodes), SIGKILL if it hangs (the nodes watch it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# the profile
def get_profile(args: argparse.Namespace, run_dir: Path, workload: list[dict]) -> tuple[Any, dict]:
    from prfaas.config_file import read_mapping
    from prfaas.scheduling.profile import load_profiles

    meta: dict[str, Any] = {}
    if args.profile:
        path = Path(args.profile)
        meta["source"] = str(path)
    else:
        lengths = sorted({r["prompt_tokens"] for r in workload})
        if len(lengths) < 2:
            lengths = [max(2, lengths[0] // 2), lengths[0]]
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < args.max_num_seqs]
        batches.append(args.max_num_seqs)
        ctx = args.profile_ctx or int(statistics.median(r["prompt_tokens"] for r in workload))
        path = run_dir / "profile.yaml"
        cmd = [sys.executable, "-m", "prfaas.cli", "profile", "--model", args.model]
        cmd += ["--device", args.prefill_device, "--lengths", *map(str, lengths)]
        cmd += ["--batches", *map(str, batches), "--ctx", str(ctx)]
        cmd += ["--steps", str(args.profile_steps), "--name", f"{args.model}-measured"]
        cmd += ["--out", str(path)]
        print(f"measuring the profile: {shlex.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"prfaas profile failed ({r.returncode}):\n{r.stderr[-3000:]}")
        meta.update(
            source="measured",
            command=shlex.join(["python3", *cmd[1:]]),
            seconds=round(time.monotonic() - t0, 1),
        )
    profiles = load_profiles(path)
    name = args.profile_name or next(iter(profiles))
    if name not in profiles:
        raise ValueError(f"no profile {name!r} in {path} (have {sorted(profiles)})")
    meta["name"] = name
    with contextlib.suppress(ValueError, KeyError):
        meta["file_meta"] = read_mapping(path).get("meta")
    return profiles[name], meta


# ---------------------------------------------------------------------------------------------
# the client
async def one_request(
    client: Any, url: str, model: str, req: dict, prompt: list[int], t0: float, out_len: int
) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + req["offset_s"] - time.time()))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": out_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res: dict[str, Any] = {**req, "sent_at": time.time(), "first_chunk_at": None}
    final = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            res["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}"
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if res["first_chunk_at"] is None:
                res["first_chunk_at"] = time.time()
            ev = json.loads(line[6:])
            if "error" in ev:
                res["error"] = ev["error"]
            if "prfaas" in ev:
                final = ev
    res["done_at"] = time.time()
    if final is None:
        res.setdefault("error", "no final chunk")
        return res
    res["prfaas"] = final["prfaas"]
    res["completion_tokens"] = len(final["prfaas"].get("token_ids", []))
    res["finish_reason"] = final["choices"][0]["finish_reason"]
    return res


async def run_schedule(
    url: str, model: str, reqs: list[dict], vocab: int, out_len: int, timeout_s: float = 600.0
) -> list[dict[str, Any]]:
    """Send ``reqs`` at their offsets; every result, or TimeoutError after ``timeout_s``."""
    import httpx

    prompts = [prompt_ids(r["prompt_tokens"], r["seed"], vocab) for r in reqs]
    limits = httpx.Limits(max_connections=len(reqs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        t0 = time.time() + 0.2
        jobs = [
            one_request(client, url, model, r, p, t0, out_len)
            for r, p in zip(reqs, prompts, strict=True)
        ]
        return list(await asyncio.wait_for(asyncio.gather(*jobs), timeout_s))


# ---------------------------------------------------------------------------------------------
# measured breakdown, simulation, comparison
def measured_breakdown(res: dict[str, Any]) -> dict[str, Any]:
    """TTFT components of one finished request from the nodes' and the router's stamps."""
    p = res["prfaas"]
    T = p["timings"]
    arrival, p_start, p_end = T["arrival"], T["p.prefill_start"], T["p.prefill_end"]
    kv_in, first = T["d.delivered_at"], T["d.first_token"]
    # with layer-wise streaming the last layer's KV can be in place at the decode node before the
    # prefill node stamps its end (the step's remaining work overlaps the send): the prefill then
    # counts up to the hand-off and the transfer tail is zero, so the parts still sum to the TTFT
    hand_off = min(p_end, kv_in)
    out = {
        "queue": p_start - arrival,
        "prefill": hand_off - p_start,
        "transfer": kv_in - hand_off,
        "first_decode": first - kv_in,
        "ttft": first - arrival,  # the nodes' TTFT: the components' sum
        "router_ttft": T["first_token_seen"] - arrival,
        "client_ttft": res["first_chunk_at"] - res["sent_at"],
        "detail": {  # finer split of the components (seconds)
            "route_and_dispatch": T["p.received"] - arrival,
            "prefill_node_wait": p_start - T["p.received"],
            "export_to_host": T["p.export_done"] - p_end,
            "wire": T["d.last_byte_at"] - T["p.send_opened"],
            "verify_and_deliver": kv_in - T["d.last_byte_at"],
            "import_wait": T["d.import_start"] - kv_in,
            "import": T["d.import_end"] - T["d.import_start"],
            "first_step": first - T["d.import_end"],
            "relay_to_router": T["first_token_seen"] - first,
        },
    }
    return out


def simulate(
    args: argparse.Namespace, profile: Any, results: list[dict[str, Any]]
) -> list[dict[str, float]]:
    """The simulator's per-request prediction for the measured arrivals and lengths."""
    import numpy as np

    from prfaas.scheduling.policies import PrfaaSPolicy
    from prfaas.scheduling.profile import HardwareProfile
    from prfaas.sim.deployment import ClusterSpec, Deployment, LinkSpec
    from prfaas.sim.engine import Simulator
    from prfaas.sim.options import SimOptions
    from prfaas.sim.workloads import Workload

    bs = args.max_num_seqs
    dec = HardwareProfile.from_dict(
        {**profile.to_dict(), "bs_max": bs, "t_decode_s": profile.decode_step_time(bs)}
    )
    dep = Deployment(
        (
            ClusterSpec("prfaas", "prfaas", 1, 0, profile),
            ClusterSpec("pd", "pd", 1, 1, profile, dec, rdma_gbps=args.intra_gbps),
        ),
        (LinkSpec("prfaas", "pd", args.link_gbps),),
    )
    arr = [r["prfaas"]["timings"]["arrival"] for r in results]
    order = sorted(range(len(results)), key=lambda i: arr[i])
    t_first = arr[order[0]]
    wl = Workload(
        "two_gpu",
        np.array([arr[i] - t_first for i in order], dtype=float),
        np.array([results[i]["prompt_tokens"] for i in order], dtype=np.int64),
        np.array([args.output_len] * len(order), dtype=np.int64),
    )
    policy = PrfaaSPolicy(args.threshold, "prfaas", "pd", cache_mode="scarce")
    sim = Simulator(dep, policy, SimOptions(pipelined=False)).run(wl)
    half_rtt = args.link_ms / 2000.0
    preds: list[dict[str, float]] = [{} for _ in results]
    for k, i in enumerate(order):
        off = bool(sim.offloaded[k])
        q = float(sim.prefill_start[k] - sim.arrival[k])
        pf = float(sim.prefill_end[k] - sim.prefill_start[k])
        tr = float(sim.kv_ready[k] - sim.prefill_end[k]) + (half_rtt if off else 0.0)
        fd = float(sim.decode_start[k] - sim.kv_ready[k] + sim.tpot[k])
        preds[i] = {
            "queue": q,
            "prefill": pf,
            "transfer": tr,
            "first_decode": fd,
            "ttft": q + pf + tr + fd,
            "offloaded": off,
            "kv_bytes": float(profile.s_kv(int(sim.uncached[k]))),
            "decode_batch_step_s": float(sim.tpot[k]),
        }
    return preds


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None}
    return {"mean": statistics.fmean(xs), "p50": statistics.median(xs)}


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in CLASSES:
        sel = [r for r in rows if cls == "all" or (cls == "offloaded") == r["offloaded"]]
        comp: dict[str, Any] = {"n": len(sel)}
        for c in (*COMPONENTS, "ttft"):
            m = _stats([r["measured"][c] for r in sel])
            p = _stats([r["predicted"][c] for r in sel])
            comp[c] = {
                "measured_mean": m["mean"],
                "measured_p50": m["p50"],
                "predicted_mean": p["mean"],
                "predicted_p50": p["p50"],
                "rel_err_mean": _rel(p["mean"], m["mean"]),
                "rel_err_p50": _rel(p["p50"], m["p50"]),
            }
        for c in ("router_ttft", "client_ttft"):
            comp[c] = _stats([r["measured"][c] for r in sel])
        out[cls] = comp
    return out


# ---------------------------------------------------------------------------------------------
# machine, report
def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.machine import cpu_model

    cpu = cpu_model()
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    for role, dev in (("prefill", args.prefill_device), ("pd", args.pd_device)):
        name = "cpu"
        if dev.startswith("cuda"):
            with contextlib.suppress(Exception):
                name = torch.cuda.get_device_name(torch.device(dev))
        info[f"{role}_device"] = f"{dev}: {name}"
    return info


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        if r.returncode == 0:
            return r.stdout.strip()
    return None


def _ms(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{1000 * x:.1f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.0f}%"


def render_md(doc: dict[str, Any]) -> str:
    s, m = doc["setup"], doc["machine"]
    lines = [
        f"# Two-GPU PrfaaS run: `{s['model']}`, {m['prefill_device']} (PrfaaS) -> "
        f"{m['pd_device']} (PD), tcp over a {s['link_gbps']:g} Gbps / {s['link_rtt_ms']:g} ms RTT link",
        "",
        f"command: `{doc['command']}`  ",
        f"machine: {m['host']}, {m['cpu']}, torch {m['torch']}; commit {doc['git_commit']}  ",
        f"requests: {s['num_requests']} at {s['rate']:g} req/s (Poisson), long {s['lengths']} "
        f"(offloaded, t = {s['threshold']:g}), short {s['short_lengths']}, {s['output_len']} "
        f"output tokens; warm-up: {s['warmup']}  ",
        f"profile: {doc['profile_meta'].get('source')} ({doc['profile_meta'].get('name')})  ",
        f"all completed: {doc['checks']['all_completed']}; offloaded {doc['checks']['offloaded']}, "
        f"PD {doc['checks']['pd']}",
        "",
        "Measured: the nodes' timestamps (queue = router arrival -> prefill start, prefill, "
        "transfer = prefill end -> all KV delivered at the decode node, first decode = KV in -> "
        "first token sampled). Predicted: `prfaas.sim` with the same deployment, arrivals, lengths "
        "and profile (transfer + RTT/2; first decode = slot wait + one decode step). Times in ms; "
        "error = (predicted - measured) / measured.",
        "",
    ]
    for cls in CLASSES:
        sm = doc["summary"][cls]
        if not sm["n"]:
            continue
        lines += [
            f"## {cls} ({sm['n']} requests)",
            "",
            "| component | measured mean | predicted mean | error | measured p50 | predicted p50 | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in (*COMPONENTS, "ttft"):
            v = sm[c]
            lines.append(
                f"| {c.replace('_', ' ')} | {_ms(v['measured_mean'])} | {_ms(v['predicted_mean'])} "
                f"| {_pct(v['rel_err_mean'])} | {_ms(v['measured_p50'])} | "
                f"{_ms(v['predicted_p50'])} | {_pct(v['rel_err_p50'])} |"
            )
        lines += [
            f"| router TTFT | {_ms(sm['router_ttft']['mean'])} | | | {_ms(sm['router_ttft']['p50'])} | | |",
            f"| client TTFT | {_ms(sm['client_ttft']['mean'])} | | | {_ms(sm['client_ttft']['p50'])} | | |",
            "",
        ]
    lines += [
        "## Per request (ms; measured / predicted)",
        "",
        "| # | tokens | where | KV MB | queue | prefill | transfer | first decode | TTFT | client TTFT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["requests"]:
        me, pr = r["measured"], r["predicted"]
        cells = " | ".join(f"{_ms(me[c])} / {_ms(pr[c])}" for c in (*COMPONENTS, "ttft"))
        lines.append(
            f"| {r['index']} | {r['prompt_tokens']} | {r['prefill_cluster']} | "
            f"{r['transfer_bytes'] / 1e6:.2f} | {cells} | {_ms(me['client_ttft'])} |"
        )
    lines += ["", "Finer split of the measured time (mean ms, all requests):", ""]
    det = doc["requests"][0]["measured"]["detail"].keys() if doc["requests"] else []
    lines.append("| " + " | ".join(det) + " |")
    lines.append("|" + "---|" * len(det))
    lines.append(
        "| "
        + " | ".join(
            _ms(statistics.fmean(r["measured"]["detail"][k] for r in doc["requests"])) for k in det
        )
        + " |"
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
def check_modules() -> None:
    import importlib.util

    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"error: missing Python modules {missing}; install them (pip install "
            f"{' '.join('pyyaml' if m == 'yaml' else m.replace('_', '-') for m in missing)})"
        )


def _raise_errors(results: list[dict[str, Any]], what: str) -> None:
    errors = [r for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} requests failed, e.g. {errors[0]['error']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result document (also written as JSON and markdown)."""
    check_modules()
    args = parse_args(argv)
    from prfaas.model.config import resolve_config

    vocab = resolve_config(args.model).vocab_size
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="two_gpu-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    workload = make_workload(args, args.seed)
    print(f"run dir {run_dir}; {len(workload)} requests, threshold {args.threshold:g}", flush=True)
    profile, profile_meta = get_profile(args, run_dir, workload)

    cfg = deploy_config(args)
    cfg_path = run_dir / "deploy.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t_start = time.monotonic()
    proc, info = start_deployment(cfg_path, run_dir, args.start_timeout)
    url = info["url"]
    print(f"deployment up in {time.monotonic() - t_start:.1f} s: {url}", flush=True)
    node_states: dict[str, Any] = {}
    tmo = args.run_timeout
    try:
        if args.warmup != "none":
            warm = make_workload(args, args.seed + 1)
            done = []
            if args.warmup == "lengths":
                lens = sorted({*args.lengths, *args.short_lengths})
                warm = [{**warm[0], "prompt_tokens": n, "offset_s": 0.0} for n in lens]
                for w in warm:
                    done += asyncio.run(
                        run_schedule(url, args.model, [w], vocab, args.output_len, tmo)
                    )
            else:
                done = asyncio.run(run_schedule(url, args.model, warm, vocab, args.output_len, tmo))
            _raise_errors(done, "warm-up")
            print(f"warm-up ({args.warmup}, {len(warm)} requests) done", flush=True)
        t_run = time.monotonic()
        results = asyncio.run(run_schedule(url, args.model, workload, vocab, args.output_len, tmo))
        run_s = time.monotonic() - t_run
        import httpx

        from prfaas.server.auth import control_headers

        for n in info.get("nodes", []):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                node_states[n["name"]] = httpx.get(
                    f"http://{n['host']}:{n['http_port']}/state",
                    timeout=5,
                    headers=control_headers(cfg["secret"]),
                ).json()
        _raise_errors(results, "measured run")
    except BaseException:
        print(f"run failed; logs:{logs_tail(run_dir)}", file=sys.stderr, flush=True)
        raise
    finally:
        stop_deployment(proc)

    preds = simulate(args, profile, results)
    rows = []
    for r, pr in zip(results, preds, strict=True):
        p = r["prfaas"]
        rows.append(
            {
                "index": r["index"],
                "request_id": p["request_id"],
                "prompt_tokens": r["prompt_tokens"],
                "arrival_offset_s": r["offset_s"],
                "prefill_cluster": p["prefill_cluster"],
                "prefill_node": p["prefill_node"],
                "offloaded": bool(p["offloaded"]),
                "transfer_bytes": int(p["transfer_bytes"]),
                "transfer_wire_bytes": int(p["transfer_wire_bytes"]),
                "completion_tokens": r["completion_tokens"],
                "finish_reason": r["finish_reason"],
                "measured": measured_breakdown(r),
                "predicted": pr,
                "timings": p["timings"],
                "client": {k: r[k] for k in ("sent_at", "first_chunk_at", "done_at")},
            }
        )
    rows.sort(key=lambda x: x["index"])
    doc = {
        "benchmark": "two_gpu",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(["python3", "benchmarks/two_gpu.py", *(argv or sys.argv[1:])]),
        "git_commit": _git_commit(),
        "machine": machine_info(args),
        "setup": {
            "model": args.model,
            "prefill_device": args.prefill_device,
            "pd_device": args.pd_device,
            "transfer_backend": "tcp",
            "link_gbps": args.link_gbps,
            "link_rtt_ms": args.link_ms,
            "threshold": args.threshold,
            "rate": args.rate,
            "num_requests": args.num_requests,
            "lengths": args.lengths,
            "short_lengths": args.short_lengths,
            "output_len": args.output_len,
            "warmup": args.warmup,
            "engine": engine_settings(args),
            "sim": {
                "pipelined": False,
                "intra_gbps": args.intra_gbps,
                "bs_max": args.max_num_seqs,
                "policy": f"PrfaaSPolicy(t={args.threshold:g}, scarce)",
            },
            "run_s": run_s,
        },
        "profile_meta": profile_meta,
        "profile": profile.to_dict(),
        "checks": {
            "all_completed": all(
                r["completion_tokens"] == args.output_len and r["finish_reason"] == "length"
                for r in rows
            ),
            "offloaded": sum(r["offloaded"] for r in rows),
            "pd": sum(not r["offloaded"] for r in rows),
            "routing_matches_sim": all(r["offloaded"] == r["predicted"]["offloaded"] for r in rows),
        },
        "summary": summarize(rows),
        "requests": rows,
        "nodes": node_states,
    }
    base = out_dir / f"two_gpu_{args.tag}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    base.with_suffix(".md").write_text(render_md(doc))
    print(render_md(doc))
    print(f"wrote {base}.json and {base}.md", flush=True)
    return doc


if __name__ == "__main__":
    main()
