"""The simulator's KV hand-off tail against the node's measured one (benchmarks/results/handoff_tail.*).

    python benchmarks/sim_handoff.py

Writes benchmarks/results/sim_handoff_tail.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from prfaas.sim.handoff_check import RESULTS, simulate_tails  # noqa: E402


def main() -> int:
    bench = json.loads(RESULTS.read_text())
    now = simulate_tails(bench)
    before = simulate_tails({**bench, "rtt_ms": 0.0, "chunk": 0}, kv_layers=0)
    rows = []
    for a, b in zip(now, before, strict=True):
        err = (a["simulated_s"] - a["measured_s"]) * 1e3
        rows.append({**a, "previous_model_s": b["simulated_s"], "error_ms": err})
    out = Path(__file__).resolve().parent / "results"
    cmd = "python benchmarks/sim_handoff.py"
    data = {"machine": cpu_model(), "command": cmd, "bench": bench, "rows": rows}
    (out / "sim_handoff_tail.json").write_text(json.dumps(data, indent=1) + "\n")
    md = [
        "# Simulated vs measured KV hand-off tail (prefill end -> all KV at the decode node)",
        "",
        f"command: `{cmd}`; machine: {cpu_model()} (the simulation is arithmetic; the measurement "
        f"is `handoff_tail.md`: `{bench['model']}`, {bench['machine']['device']}, "
        f"{bench['backend']}, {bench['link_gbps']} Gbps / {bench['rtt_ms']} ms RTT, chunk "
        f"{bench['chunk']})",
        "",
        "Simulator: a profile of the measured prefill times and KV sizes; layer-wise streaming sends "
        "every layer but the last while the last chunk computes, the last layer's KV (the MLA KV of "
        "one of the model's MLA layers) after the prefill; one-way latency RTT/2. Previous model: "
        "the flow started with the prefill, no last-layer tail, no latency.",
        "",
        "| tokens | mode | measured ms | simulated ms | error ms | previous model ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['tokens']} | {r['mode']} | {1e3 * r['measured_s']:.1f} | "
            f"{1e3 * r['simulated_s']:.1f} | {r['error_ms']:+.1f} | "
            f"{1e3 * r['previous_model_s']:.1f} |"
        )
    (out / "sim_handoff_tail.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
