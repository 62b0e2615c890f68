"""Live role switches on a local deployment (``prfaas up``, tiny model on CPU) under a workload that
shifts from prefill-heavy to decode-heavy: the gateway's long-term rebalancing should move a PD-D node
to prefill in the first phase and a PD-P node to decode in the second (drain, ``POST /admin/role``,
no restart).  A benchmark, not a test (minutes of CPU).

    python benchmarks/role_switch.py [--phase-s 40] [--workers 12]

Writes benchmarks/results/role_switch_local.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from prfaas.server.launcher import up_in_subprocess  # noqa: E402

CONFIG = {
    "model": "tiny",
    "device": "cpu",
    "secret": "role-switch-bench-secret-0123",
    "engine": {"max_num_seqs": 4, "max_model_len": 2048, "max_num_batched_tokens": 512},
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "prfaas-0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [
                {"name": "pd-p0", "role": "prefill"},
                {"name": "pd-d0", "role": "decode"},
                {"name": "pd-d1", "role": "decode"},
            ],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0, "rtt_ms": 4.0}],
    "router": {
        # every prefill in the PD cluster: the PD roles are what this benchmark exercises
        "threshold": 100000,
        "max_inflight": 64,
        "poll_interval_s": 0.5,
        "prefill_timeout_s": 120.0,
        "rebalance_opts": {
            "period_s": 2.0,
            "confirm": 2,
            "reverse_after_s": 10.0,
            "prefill_hi_s": 0.5,
            "prefill_lo_s": 0.2,
            "decode_wait_hi": 0.1,
        },
    },
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase-s", type=float, default=40.0)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="prfaas-rs-"))
    with up_in_subprocess(CONFIG, d, start_timeout_s=300, stop_timeout_s=60) as info:
        url = info["url"]
        timeline: list[dict] = []
        done: list[dict] = []
        stop = threading.Event()
        phase = {"name": "prefill-heavy"}
        t0 = time.monotonic()

        def roles() -> dict[str, str]:
            nodes = httpx.get(url + "/admin/nodes", timeout=10).json()["nodes"]
            return {n["name"]: n["role"] for n in nodes if n["cluster"] == "pd"}

        def watch() -> None:
            last = None
            while not stop.is_set():
                try:
                    r = roles()
                except httpx.HTTPError:
                    r = None
                if r and r != last:
                    timeline.append(
                        {"t": round(time.monotonic() - t0, 1), "phase": phase["name"], "roles": r}
                    )
                    last = r
                time.sleep(0.5)

        def worker(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(timeout=300) as c:
                while not stop.is_set():
                    heavy = phase["name"] == "prefill-heavy"
                    n = rng.randint(1200, 1800) if heavy else rng.randint(16, 48)
                    body = {
                        "model": "tiny",
                        "prompt": [rng.randrange(256) for _ in range(n)],
                        "max_tokens": 1 if heavy else 150,
                        "ignore_eos": True,
                        "temperature": 0,
                    }
                    t = time.monotonic()
                    try:
                        r = c.post(url + "/v1/completions", json=body)
                        ok = r.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    done.append(
                        {"phase": phase["name"], "ok": ok, "s": time.monotonic() - t, "n": n}
                    )

        threads = [threading.Thread(target=watch, daemon=True)]
        threads += [
            threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.workers)
        ]
        for t in threads:
            t.start()
        time.sleep(args.phase_s)
        phase["name"] = "decode-heavy"
        time.sleep(1.5 * args.phase_s)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        final = roles()
        metrics = httpx.get(url + "/metrics", timeout=10).text
        switches = [
            ln for ln in metrics.splitlines() if ln.startswith("prfaas_role_switches_total{")
        ]
    per = {}
    for ph in ("prefill-heavy", "decode-heavy"):
        rows = [x for x in done if x["phase"] == ph]
        per[ph] = {"requests": len(rows), "ok": sum(x["ok"] for x in rows)}
    cmd = "python benchmarks/role_switch.py " + " ".join(sys.argv[1:])
    data = {
        "machine": cpu_model(),
        "command": cmd.strip(),
        "phase_s": args.phase_s,
        "workers": args.workers,
        "config": CONFIG,
        "timeline": timeline,
        "final_roles": final,
        "switch_counters": switches,
        "requests": per,
    }
    out = Path(args.out)
    (out / "role_switch_local.json").write_text(json.dumps(data, indent=1) + "\n")
    md = [
        "# Live role switches on a local deployment (tiny, CPU)",
        "",
        f"command: `{data['command']}`; machine: {data['machine']} (shared with other jobs)",
        "",
        f"`prfaas up` with 1 PrfaaS node and a PD cluster of pd-p0 (prefill), pd-d0, pd-d1 (decode); "
        f"every prefill in the PD cluster (fixed t = 100000) so that the PD roles carry the load; "
        f"rebalancing every 2 s, 2 checks in a row, a switch back no sooner than 10 s after. "
        f"{args.workers} closed-loop clients: {args.phase_s:.0f} s prefill-heavy (1.2-1.8K-token "
        f"prompts, 1 output token), then {1.5 * args.phase_s:.0f} s decode-heavy (16-48-token "
        "prompts, 150 output tokens).",
        "",
        "| t (s) | phase | pd-p0 | pd-d0 | pd-d1 |",
        "|---|---|---|---|---|",
    ]
    for e in timeline:
        r = e["roles"]
        md.append(
            f"| {e['t']} | {e['phase']} | {r.get('pd-p0')} | {r.get('pd-d0')} | {r.get('pd-d1')} |"
        )
    md += [
        "",
        "| phase | requests | ok |",
        "|---|---|---|",
        *[f"| {k} | {v['requests']} | {v['ok']} |" for k, v in per.items()],
        "",
        "Counters: " + ", ".join(f"`{s}`" for s in switches),
    ]
    (out / "role_switch_local.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
