"""Prefix pool on/off: replay the Mooncake synthetic trace with ``prfaas bench`` against ``prfaas up``
(small node caches so prefixes get evicted), and compare TTFT and the prefill tokens the nodes
computed.  Writes benchmarks/results/prefix_pool.{json,md}.

    python -m benchmarks.prefix_pool --max-requests 120 --time-scale 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from prfaas.server.auth import control_headers

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def deploy(pool: bool, num_blocks: int) -> dict:
    d = yaml.safe_load((ROOT / "prfaas" / "configs" / "deploy_local.yaml").read_text())
    d["engine"].update(num_blocks=num_blocks, num_checkpoints=16, max_model_len=4096)
    d["prefix_pool"] = pool
    d["prefix_pool_segment_mb"] = 256
    d["router"]["cache_mode"] = "auto" if pool else "scarce"
    return d


def run_one(pool: bool, args: argparse.Namespace, work: Path) -> dict:
    cfg = work / f"deploy_{'pool' if pool else 'nopool'}.yaml"
    cfg.write_text(yaml.safe_dump(deploy(pool, args.num_blocks)))
    ready = work / f"ready_{pool}.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "prfaas.cli", "up", "--config", str(cfg), "--port", "0"]
        + ["--ready-file", str(ready), "--log-dir", str(work / f"logs_{pool}")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        t0 = time.monotonic()
        while not ready.exists():
            if up.poll() is not None or time.monotonic() - t0 > 240:
                raise RuntimeError("prfaas up did not start")
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        out = work / f"bench_{pool}.json"
        subprocess.run(
            [sys.executable, "-m", "prfaas.cli", "bench", "--url", info["url"], "--trace"]
            + [str(args.trace), "--max-requests", str(args.max_requests)]
            + ["--time-scale", str(args.time_scale), "--max-input-tokens", str(args.max_input)]
            + ["--skip-requests", str(args.skip_requests)]
            + [
                "--max-output-tokens",
                "8",
                "--block-tokens",
                str(args.block_tokens),
                "--no-progress",
            ]
            + ["--save", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        report = json.loads(out.read_text())
        nodes = {}
        for n in info["nodes"]:
            st = httpx.get(
                f"http://{n['host']}:{n['http_port']}/state",
                timeout=10,
                headers=control_headers(yaml.safe_load(cfg.read_text())["secret"]),
            ).json()
            nodes[n["name"]] = {
                "prefill_tokens_computed": st["prefill_tokens_computed"],
                "cache_hit_tokens": st["cache_hit_tokens"],
                "cache_query_tokens": st["cache_query_tokens"],
                "pool": st.get("pool"),
            }
        return {"bench": report, "nodes": nodes}
    finally:
        up.terminate()
        up.wait(60)


def summary(r: dict) -> dict:
    b = r["bench"]
    ttft = {k: round(v, 1) for k, v in b.get("ttft_ms", {}).items() if k in ("n", "p50", "p90")}
    prefill = sum(n["prefill_tokens_computed"] for n in r["nodes"].values() if n)
    hits = sum(n["cache_hit_tokens"] for n in r["nodes"].values())
    fetched = sum((n["pool"] or {}).get("blocks_fetched", 0) for n in r["nodes"].values())
    return {
        "completed": b.get("completed"),
        "ttft": ttft,
        "prefill_tokens_computed": prefill,
        "cache_hit_tokens": hits,
        "pool_blocks_fetched": fetched,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--max-requests", type=int, default=120)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--max-input", type=int, default=2000)
    ap.add_argument("--skip-requests", type=int, default=0, help="start at this trace request")
    ap.add_argument("--block-tokens", type=int, default=512, help="prompt tokens per hash id")
    ap.add_argument("--num-blocks", type=int, default=160, help="MLA blocks per node (small)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_pool")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefix-pool-bench-"))
    res = {p: run_one(p, args, work) for p in (False, True)}
    out = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs (no GPU)",
        "args": {k: str(v) for k, v in vars(args).items()},
        "without_pool": summary(res[False]),
        "with_pool": summary(res[True]),
        "raw": {"without_pool": res[False]["nodes"], "with_pool": res[True]["nodes"]},
    }
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2, default=str))
    a, b = out["without_pool"], out["with_pool"]
    lines = [
        "# Prefix pool (Mooncake Store second tier) on/off",
        "",
        f"Machine: {out['machine']}. Trace: {args.trace.name}, requests {args.skip_requests} to"
        f" {args.skip_requests + args.max_requests - 1}, {args.block_tokens} prompt tokens per hash id,",
        f"time scale {args.time_scale}, prompts capped at {args.max_input} tokens, tiny model on CPU,",
        f"{args.num_blocks} MLA blocks per node. Command: `python -m benchmarks.prefix_pool"
        f" --skip-requests {args.skip_requests} --max-requests {args.max_requests}"
        f" --block-tokens {args.block_tokens} --max-input {args.max_input}"
        f" --num-blocks {args.num_blocks} --time-scale {args.time_scale}`.",
        "",
        "| | without pool | with pool |",
        "|---|---|---|",
        f"| completed | {a['completed']} | {b['completed']} |",
        f"| prefill tokens computed (all nodes) | {a['prefill_tokens_computed']} | {b['prefill_tokens_computed']} |",
        f"| cache hit tokens | {a['cache_hit_tokens']} | {b['cache_hit_tokens']} |",
        f"| blocks fetched from the pool | {a['pool_blocks_fetched']} | {b['pool_blocks_fetched']} |",
        f"| TTFT ms | {json.dumps(a['ttft'])} | {json.dumps(b['ttft'])} |",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
