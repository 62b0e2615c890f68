"""GPU path vs PyTorch path for the whole model, teacher-forced (run on a GPU machine).

Random-weight models have small logit margins, so greedy tokens can part ways on bf16 noise alone; the
comparison therefore feeds both paths the SAME tokens (a prefill, then single-token decode steps
through the paged cache) and compares logits step by step.

1. ``small``, bf16 on the GPU: the fused GPU path (fla + prfaas Triton kernels; decode eager and
   from CUDA graphs) vs the PyTorch path (PRFAAS_DISABLE_FLA=1).
2. ``tiny``: GPU bf16 (fla) vs CPU fp32 (PyTorch path).

    python benchmarks/gpu_check_model.py --out benchmarks/results/model_gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas.cache.hybrid import CacheConfig, HybridCache  # noqa: E402
from prfaas.engine.model_runner import ModelRunner  # noqa: E402
from prfaas.model import kda_ops  # noqa: E402
from prfaas.model.batch import SeqInput  # noqa: E402
from prfaas.model.checkpoint import build_model  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.inference_mode()
def forced_logits(
    model, tokens: list[int], n_prefill: int, fla: bool, graphs: bool = False, static: bool = False
) -> list[torch.Tensor]:
    """Logits of the prefill and of each decode step. ``graphs``: decode steps through the
    engine's ModelRunner (static-shape decode replayed from CUDA graphs) instead of model.step."""
    os.environ["PRFAAS_DISABLE_FLA"] = "0" if fla else "1"
    runner = ModelRunner(model, cuda_graphs=graphs, pad=True) if graphs or static else None
    step = runner.step if runner is not None else model.step
    dev = model.lm_head.weight.device
    cache = HybridCache(
        model.config,
        CacheConfig(block_size=16, num_blocks=len(tokens) // 16 + 4, max_seqs=1, num_checkpoints=1),
        dev,
        model.lm_head.weight.dtype,
    )
    seq = cache.open(tokens, need_state=False, max_reuse=0)
    cache.reserve(seq, len(tokens))
    t = torch.tensor(tokens)
    out = [model.step([SeqInput(t[:n_prefill], 0, seq.blocks, seq.slot)], cache.tensors)[0]]
    for p in range(n_prefill, len(tokens)):
        out.append(step([SeqInput(t[p : p + 1], p, seq.blocks, seq.slot)], cache.tensors)[0])
    os.environ.pop("PRFAAS_DISABLE_FLA", None)
    return [o.float().cpu() for o in out]


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    errs = [rel(x, y) for x, y in zip(a, b, strict=True)]
    return {
        "per_step": [round(e, 4) for e in errs],
        "prefill_logits_rel_err": errs[0],
        "decode_logits_rel_err_max": max(errs[1:]),
        "decode_logits_rel_err_mean": sum(errs[1:]) / len(errs[1:]),
        "argmax_agree": sum(int(x.argmax() == y.argmax()) for x, y in zip(a, b, strict=True))
        / len(a),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="only `small`: fused eager and graphs")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "fla": kda_ops.fla_available()}
    toks = [(13 * i + 5) % 250 for i in range(args.tokens + args.steps)]
    small = build_model("small", device="cuda", dtype=torch.bfloat16, seed=0)
    ref = forced_logits(small, toks, args.tokens, False)
    res["small_bf16_fla_vs_torch_path"] = compare(
        forced_logits(small, toks, args.tokens, True), ref
    )
    print(json.dumps(res), flush=True)
    res["small_bf16_graphs_vs_torch_path"] = compare(
        forced_logits(small, toks, args.tokens, True, graphs=True), ref
    )
    print(json.dumps(res), flush=True)
    res["small_bf16_static_eager_vs_torch_path"] = compare(
        forced_logits(small, toks, args.tokens, True, static=True), ref
    )
    print(json.dumps(res), flush=True)
    if args.quick:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
        return 0
    del small
    cpu = build_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    gpu = build_model("tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    t2 = toks[: 300 + args.steps]
    res["tiny_gpu_bf16_fla_vs_cpu_fp32"] = compare(
        forced_logits(gpu, t2, 300, True), forced_logits(cpu, t2, 300, False)
    )
    gpu32 = build_model("tiny", device="cuda", dtype=torch.float32, seed=0)
    res["tiny_gpu_fp32_fla_vs_cpu_fp32"] = compare(
        forced_logits(gpu32, t2, 300, True), forced_logits(cpu, t2, 300, False)
    )
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
