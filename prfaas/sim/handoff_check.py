"""The simulator's hand-off against the node's measured one (``benchmarks/results/handoff_tail.json``).

The benchmark prefills one request at a time on a prefill node and measures the *tail*: prefill end →
the whole KVCache in at the decode node, with layer-wise streaming and with the export sent after the
prefill, over an emulated link.  :func:`simulate_tails` replays its rows through the simulator: a
profile made of the measured prefill times and KV sizes, the benchmark's chunk, link bandwidth and
one-way latency (RTT/2), and the model's number of MLA layers (whose KV grows with length)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prfaas.scheduling.policies import make_policy
from prfaas.scheduling.profile import HardwareProfile
from prfaas.sim.deployment import ClusterSpec, Deployment, LinkSpec
from prfaas.sim.engine import Simulator
from prfaas.sim.options import SimOptions
from prfaas.sim.workloads import Workload

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "handoff_tail.json"


def _mla_layers(model: str) -> int:
    from prfaas.model.config import PRESETS

    return len(PRESETS[model].full_attn_layers)


def simulate_tails(bench: dict, kv_layers: int | None = None) -> list[dict]:
    """One row per measured row: ``{tokens, mode, measured_s, simulated_s}``."""
    rows = bench["rows"]
    by_len: dict[int, dict] = {}
    for r in rows:
        d = by_len.setdefault(int(r["tokens"]), {"bytes": r["bytes"], "prefill": []})
        d["prefill"].append(r["prefill_s"])
    lens = sorted(by_len)
    if len(lens) < 2:
        raise ValueError("need measured rows at >= 2 prompt lengths")
    prof = HardwareProfile(
        "measured",
        1,
        tuple(lens),
        tuple(float(by_len[x]["bytes"]) for x in lens),
        tuple(float(np.mean(by_len[x]["prefill"])) for x in lens),
        bs_max=4,
        t_decode_s=1e-3,
    )
    layers = kv_layers if kv_layers is not None else _mla_layers(bench["model"])
    out = []
    for r in rows:
        n = int(r["tokens"])
        dep = Deployment(
            (
                ClusterSpec(
                    "prfaas", "prfaas", 1, 0, prof, kv_layers=layers, chunk_tokens=bench["chunk"]
                ),
                ClusterSpec("pd", "pd", 1, 1, prof, prof),
            ),
            (LinkSpec("prfaas", "pd", bench["link_gbps"], latency_s=bench["rtt_ms"] / 2000),),
        )
        w = Workload("one", np.zeros(1), np.asarray([n]), np.asarray([1]), None)
        opt = SimOptions(pipelined=r["mode"] == "layerwise")
        res = Simulator(dep, make_policy("prfaas", 0.0), opt).run(w)
        out.append(
            {
                "tokens": n,
                "mode": r["mode"],
                "measured_s": float(r["tail_s"]),
                "simulated_s": float(res.kv_ready[0] - res.prefill_end[0]),
            }
        )
    return out


def check(path: Path = RESULTS) -> list[dict]:
    """Simulated vs measured tails of the recorded benchmark."""
    return simulate_tails(json.loads(Path(path).read_text()))


if __name__ == "__main__":  # pragma: no cover
    for row in check():
        print(row)
