"""The host's share of an engine decode step: scheduling, packing the inputs, sampling bookkeeping
and outputs, with the model replaced by a stub that returns zero logits at once (a benchmark, not a
test). On a GPU this share adds to the graph replay unless it overlaps with it.

    python benchmarks/engine_host.py [--batches 32 128 256] [--ctx 1024]

Writes benchmarks/results/engine_host_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine import start_decodes  # noqa: E402
from benchmarks.machine import cpu_model  # noqa: E402
from prfaas import EngineConfig, LLMEngine  # noqa: E402


class _StubGraphs:
    """Stands in for DecodeGraphs: the packed inputs arrive, zero logits come back."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def run(
        self,
        packed: torch.Tensor,
        batch: int,
        blocks: int,
        cache: object,
        device_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.zeros(batch, self.vocab)


def host_step_seconds(batch: int, ctx: int, steps: int, pipelined: bool = True) -> float:
    eng = LLMEngine(
        EngineConfig(
            model="tiny",
            async_decode=pipelined,
            max_num_batched_tokens=batch * ctx,
            max_num_seqs=batch,
            max_model_len=ctx + steps + 64,
            enable_prefix_cache=False,
            num_blocks=batch * ((ctx + steps + 64) // 16 + 1) + 8,
        )
    )
    vocab = eng.model_config.vocab_size
    eng.runner.model.step = lambda seqs, cache, cb=None: torch.zeros(len(seqs), vocab)
    eng.runner.graphs, eng.runner.pad = _StubGraphs(vocab), True
    start_decodes(eng, batch, ctx, max_tokens=steps + 8)
    for _ in range(3):
        eng.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    assert eng.runner.num_graph_steps >= steps
    assert not pipelined or eng.num_pipelined_steps >= steps  # the pipeline did run
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="*", default=[32, 128, 256])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for b in args.batches:
        dt = min(host_step_seconds(b, args.ctx, args.steps) for _ in range(3))
        sync = min(host_step_seconds(b, args.ctx, args.steps, False) for _ in range(3))
        rows.append({"batch": b, "context": args.ctx, "host_step_s": dt, "sync_host_step_s": sync})
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{cpu_model()} ({os.cpu_count()} cores)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = f"python benchmarks/engine_host.py {' '.join(sys.argv[1:])}".strip()
    doc = {"machine": machine, "torch": torch.__version__, "command": cmd, "rows": rows}
    doc["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "engine_host_cpu.json").write_text(json.dumps(doc, indent=2))
    lines = [
        f"# Host share of a decode step (model stubbed), {machine}",
        "",
        f"torch {torch.__version__}; command: `{cmd}`",
        "",
        "| batch | context | host time per step (pipelined, the default) | synchronous |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['context']} | {r['host_step_s'] * 1e3:.3f} ms "
        f"| {r['sync_host_step_s'] * 1e3:.3f} ms |"
        for r in rows
    ]
    (out / "engine_host_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
