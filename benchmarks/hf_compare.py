"""Decode tokens/s of prfaas (`small` preset, CUDA graphs) against HF transformers `generate` on
flash-linear-attention's KDA model class at the same hidden size, layer count and heads, both at the
same batch and prompt length, measured in one run (GPU; a benchmark, not a test).

    python benchmarks/hf_compare.py [--batch 32] [--prompt 1024] [--new 64]

Decode rate = batch * (new - 1) / (t(new tokens) - t(1 token)): the prefill and the first token cancel
out. Writes benchmarks/results/hf_compare.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine import bench_decode, device_info  # noqa: E402
from prfaas.model.config import PRESETS  # noqa: E402


def hf_decode_rate(batch: int, prompt: int, new: int) -> dict:
    from fla.models import KDAConfig, KDAForCausalLM

    c = PRESETS["small"]
    cfg = KDAConfig(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_heads=c.kda_num_heads,
        head_dim=c.kda_head_dim,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        fuse_cross_entropy=False,
    )
    model = KDAForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 250, (batch, prompt), device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)  # warm-up: Triton compilation
    t1, tn = timed(1), timed(new)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "t_1": t1,
        "t_new": tn,
        "tokens_per_s": batch * (new - 1) / (tn - t1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    step_s, eng = bench_decode({"model": "small", "device": "cuda"}, args.batch, args.prompt, 20)
    ours = {"step_s": step_s, "tokens_per_s": args.batch / step_s}
    info = device_info(eng.device)
    del eng
    torch.cuda.empty_cache()
    try:
        hf = hf_decode_rate(args.batch, args.prompt, args.new)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        hf = {"error": f"{type(e).__name__}: {e}"}
    res = {
        "machine": info,
        "batch": args.batch,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "prfaas_small_cuda_graphs": ours,
        "hf_generate_fla_kda": hf,
        "command": "python benchmarks/hf_compare.py " + " ".join(sys.argv[1:]),
    }
    if "tokens_per_s" in hf:
        res["speedup"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_compare.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"# Decode vs HF `generate` (fla KDAForCausalLM), {info['device']}",
        "",
        f"batch {args.batch}, prompt {args.prompt} tokens, bf16; command: `{res['command']}`",
        "",
        "| system | decode tokens/s |",
        "|---|---|",
        f"| prfaas `small` (12 KDA + 4 MLA, CUDA graphs) | {ours['tokens_per_s']:.0f} |",
        f"| HF generate, fla KDAForCausalLM (16 KDA layers, same hidden/heads/MLP) | "
        f"{hf.get('tokens_per_s', float('nan')):.0f} |",
    ]
    if "speedup" in res:
        lines.append(f"\nprfaas / HF: **{res['speedup']:.2f}x** (target 5x)")
    else:
        lines.append(f"\nHF run failed: {hf['error']}")
    (out / "hf_compare.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
