"""Where one prefill step's time goes on the GPU (torch.profiler; a diagnostic, not a benchmark).

python benchmarks/profile_prefill.py [--model small] [--tokens 32768]
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
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    T = args.tokens
    eng = LLMEngine(
        EngineConfig(
            model=args.model,
            max_num_batched_tokens=T,
            max_num_seqs=2,
            max_model_len=T + 8,
            enable_prefix_cache=False,
            num_blocks=-(-(T + 8) // 16) * 2 + 8,
        )
    )

    def one(r: int) -> float:
        eng.add_request([(7 * i + r) % 250 for i in range(T)], SamplingParams(max_tokens=1))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        while eng.has_unfinished():
            eng.step()
        return dt

    one(0)
    print(f"prefill {T} tokens: {min(one(r) for r in (1, 2)) * 1e3:.1f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        one(3)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
