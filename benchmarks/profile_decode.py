"""Where one decode step's time goes on the GPU (torch.profiler; a diagnostic, not a benchmark).

python benchmarks/profile_decode.py [--model small] [--batch 32] [--ctx 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="profile without CUDA graphs")
    args = ap.parse_args()
    B, ctx = args.batch, args.ctx
    eng = LLMEngine(
        EngineConfig(
            model=args.model,
            max_num_batched_tokens=B * ctx,
            max_num_seqs=B,
            max_model_len=ctx + 64,
            enable_prefix_cache=False,
            cuda_graphs=not args.eager,
            num_blocks=B * ((ctx + 64) // 16 + 1) + 8,
        )
    )
    for b in range(B):
        eng.add_request(
            [(b + 3 * i) % 250 for i in range(ctx)],
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        )
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    print(f"decode step: {(time.perf_counter() - t0) / 5 * 1e3:.2f} ms at batch {B}")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
