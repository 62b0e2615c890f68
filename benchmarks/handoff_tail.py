"""The hand-off tail: time from the end of a request's prefill to the moment its whole KVCache is in
at the decode node, with layer-wise streaming (layer i on the wire while layer i+1 computes) against
sending the export after the prefill, over an emulated link. A benchmark, not a test.

    python benchmarks/handoff_tail.py [--model tiny] [--gbps 0.2] [--rtt-ms 5] [--tokens 1024 4096]

Writes benchmarks/results/handoff_tail.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine import device_info  # noqa: E402
from prfaas import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from prfaas.kv.streaming import LayerStreamer  # noqa: E402
from prfaas.server.node.kv_layout import layout_for_engine  # noqa: E402
from prfaas.transfer.link import LinkShaperSpec  # noqa: E402
from prfaas.transfer.registry import create_receiver, create_sender  # noqa: E402

SECRET = "benchmark-cluster-secret"


def one(eng, streamer, sender, rx, prompt, rid, layerwise: bool) -> dict:
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1), rid)
    if layerwise:
        streamer.expect(rid, rx.address)
    t0 = time.time()
    while not any(o.finish_reason == "prefilled" for o in eng.step()):
        pass
    prefill_end = time.time()
    if layerwise:
        stream = streamer.handoff(rid).stream
    else:
        exp = eng.export_request(rid)
        eng.release(rid)
        stream = sender.send_export(rx.address, exp)
    stream.wait(120)
    d = rx.deliveries.get(timeout=120)
    t = d.timings
    return {
        "prefill_s": prefill_end - t0,
        "tail_s": t.delivered_at - prefill_end,
        "bytes": t.payload_bytes,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--gbps", type=float, default=0.2)
    ap.add_argument("--rtt-ms", type=float, default=5.0)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (token budget)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    eng = LLMEngine(
        EngineConfig(
            model=args.model,
            role="prefill",
            enable_prefix_cache=False,
            max_num_batched_tokens=args.chunk,
            max_model_len=max(args.tokens) + 8,
            num_blocks=max(args.tokens) // 16 + 16,
        )
    )
    layout = layout_for_engine(eng)
    rx = create_receiver(args.backend, layout, SECRET, host="127.0.0.1", port=0).start()
    sender = create_sender(
        args.backend, layout, SECRET, connections=2, link=LinkShaperSpec(args.gbps, args.rtt_ms)
    )
    streamer = LayerStreamer(eng, sender)
    eng.layer_listener = None  # toggled per run below
    rows = []
    for T in args.tokens:
        for mode in ("after_prefill", "layerwise"):
            runs = []
            for r in range(args.repeats + 1):
                eng.layer_listener = streamer._on_layer if mode == "layerwise" else None
                prompt = [(5 * i + r + T) % 250 for i in range(T)]
                res = one(eng, streamer, sender, rx, prompt, f"{mode}-{T}-{r}", mode == "layerwise")
                if r:
                    runs.append(res)
            row = {
                "tokens": T,
                "mode": mode,
                "bytes": runs[0]["bytes"],
                "prefill_s": statistics.median(x["prefill_s"] for x in runs),
                "tail_s": statistics.median(x["tail_s"] for x in runs),
                "wire_time_s": runs[0]["bytes"] * 8 / (args.gbps * 1e9),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    sender.close()
    rx.close()
    info = device_info(eng.device)
    res = {
        "model": args.model,
        "machine": info,
        "link_gbps": args.gbps,
        "rtt_ms": args.rtt_ms,
        "chunk": args.chunk,
        "backend": args.backend,
        "rows": rows,
        "command": "python benchmarks/handoff_tail.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "handoff_tail.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"# Hand-off tail: `{args.model}` on {info['device']}, {args.backend} backend, "
        f"{args.gbps} Gbps / {args.rtt_ms} ms RTT emulated link, prefill chunk {args.chunk}",
        "",
        f"command: `{res['command']}`; medians of {args.repeats} runs",
        "",
        "| prompt tokens | mode | KV bytes | prefill | tail (prefill end -> all KV in) | bytes / bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['mode']} | {r['bytes']} | {r['prefill_s'] * 1e3:.0f} ms | "
            f"{r['tail_s'] * 1e3:.1f} ms | {r['wire_time_s'] * 1e3:.1f} ms |"
        )
    (out / "handoff_tail.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
