"""The hand-off tail measured on live nodes: a PrfaaS prefill node and a PD decode node (in this
process, their engine threads, senders and KV receiver as in a deployment, no HTTP), the KV crossing
the emulated inter-cluster link. Tail = prefill end on the prefill node (its ``prefill_end`` stamp)
to the last KV byte in at the decode node (its receiver's ``last_byte_at``), and to the import's
end; three ways: the whole export sent after the prefill and imported once delivered
(``after_prefill``), each layer of the last prefill chunk sent while the next layers compute and
imported once delivered (``layerwise``), and sent that way and written into the decode engine's
cache as each layer lands (``layerwise_import``, the deployment's default). A benchmark, not a test.

    python benchmarks/handoff_live.py [--gbps 1.0] [--rtt-ms 5] [--tokens 1024 3000] [--repeats 3]

Writes benchmarks/results/handoff_live.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas.server.config import parse_deploy_config  # noqa: E402
from prfaas.server.node.server import NodeServer  # noqa: E402
from prfaas.server.protocol import (  # noqa: E402
    DecodeRequest,
    DecodeTarget,
    PrefillRequest,
    SamplingParamsMsg,
)


def deployment(model: str, gbps: float, rtt_ms: float) -> dict:
    return {
        "model": model,
        "device": "cpu",
        "secret": "handoff-live-secret-0123456789",
        "clusters": [
            {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "f0", "role": "prefill"}]},
            {
                "name": "pd",
                "kind": "pd",
                "nodes": [{"name": "p0", "role": "prefill"}, {"name": "d0", "role": "decode"}],
            },
        ],
        "links": [{"src": "prfaas", "dst": "pd", "gbps": gbps, "rtt_ms": rtt_ms}],
        "router": {"threshold": 256},
    }


async def one(f0: NodeServer, d0: NodeServer, rid: str, prompt: list[int]) -> dict:
    params = SamplingParamsMsg(temperature=0.0, max_tokens=1, ignore_eos=True)
    exp, token_start = await d0.decode.open(
        DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=params)
    )
    events: list[dict] = []

    async def consume() -> None:
        async for line in d0.decode.stream(exp, token_start):
            events.append(json.loads(line))

    task = asyncio.create_task(consume())
    res = await f0.prefill.prefill(
        PrefillRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            token_start=token_start,
            params=params,
            decode=DecodeTarget(cluster="pd", kv_host=d0.node.host, kv_port=d0.kv_port),
            timeout_s=300.0,
        )
    )
    await asyncio.wait_for(task, 300)
    kv = next(e for e in events if e["event"] == "kv")["timings"]
    t = res.timings
    end = t["prefill_end"]
    return {
        "prefill_s": end - t["prefill_start"],
        "first_byte_before_end_s": end - kv["first_data_at"],
        "tail_last_byte_s": kv["last_byte_at"] - end,
        "tail_imported_s": kv["import_end"] - end,
        "last_byte_to_imported_s": kv["import_end"] - kv["last_byte_at"],
        "layers_written_early": kv.get("layers_written_early", 0.0),
        "bytes": res.payload_bytes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--gbps", type=float, default=1.0)
    ap.add_argument("--rtt-ms", type=float, default=5.0)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1024, 3000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = parse_deploy_config(deployment(args.model, args.gbps, args.rtt_ms))
    nodes = {n: NodeServer(cfg, n) for n in ("f0", "d0")}
    f0, d0 = nodes["f0"], nodes["d0"]
    streamer = f0.prefill.streamer
    assert streamer is not None
    for n in nodes.values():
        n.start()
    on_layer = d0.decode.receiver.on_layer
    assert on_layer is not None
    rng = random.Random(11)
    rows = []
    try:
        for T in args.tokens:
            for mode in ("after_prefill", "layerwise", "layerwise_import"):
                lw = mode != "after_prefill"
                f0.prefill.streamer = streamer if lw else None
                f0.engine.layer_listener = streamer._on_layer if lw else None
                d0.decode.receiver.on_layer = on_layer if mode == "layerwise_import" else None
                runs = []
                for r in range(args.repeats + 1):  # the first run warms up
                    prompt = [rng.randrange(1, 250) for _ in range(T)]
                    out = asyncio.run(one(f0, d0, f"{mode}-{T}-{r}", prompt))
                    if r:
                        runs.append(out)
                row = {"tokens": T, "mode": mode, "bytes": runs[0]["bytes"]}
                for k in (
                    "prefill_s",
                    "first_byte_before_end_s",
                    "tail_last_byte_s",
                    "tail_imported_s",
                    "last_byte_to_imported_s",
                    "layers_written_early",
                ):
                    row[k] = statistics.median(x[k] for x in runs)
                row["wire_time_s"] = row["bytes"] * 8 / (args.gbps * 1e9)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for n in nodes.values():
            n.close()
    res = {
        "model": args.model,
        "machine": {"nproc": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        "link_gbps": args.gbps,
        "rtt_ms": args.rtt_ms,
        "rows": rows,
        "command": "python benchmarks/handoff_live.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "handoff_live.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        f"# Hand-off tail on live nodes: `{args.model}` on CPU, {args.gbps} Gbps / "
        f"{args.rtt_ms} ms RTT emulated link (prfaas -> pd)",
        "",
        f"Command: `{res['command']}`; medians of {args.repeats} runs after a warm-up; "
        f"{res['machine']['nproc']} cores shared with other work (load {res['machine']['loadavg_1m_at_end']} "
        "at the end).",
        "",
        "Tail = prefill end on the prefill node to the last KV byte in at the decode node "
        "(and to the end of the import); 'first byte before end' > 0: KV was on the wire before "
        "the prefill ended. 'last byte -> imported': the decode node's own part of the tail "
        "(verify, hand to the engine, wait for the next step, write what is not written yet); "
        "'layers early': layers written into the engine's cache as they landed.",
        "",
        "| prompt tokens | mode | KV bytes | prefill | first byte before end | tail to last byte "
        "| tail to imported | last byte -> imported | layers early | bytes / bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['mode']} | {r['bytes']} | {r['prefill_s'] * 1e3:.0f} ms | "
            f"{r['first_byte_before_end_s'] * 1e3:.1f} ms | {r['tail_last_byte_s'] * 1e3:.1f} ms | "
            f"{r['tail_imported_s'] * 1e3:.1f} ms | {r['last_byte_to_imported_s'] * 1e3:.1f} ms | "
            f"{r['layers_written_early']:.0f} | {r['wire_time_s'] * 1e3:.1f} ms |"
        )
    (out / "handoff_live.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
