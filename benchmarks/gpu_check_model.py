"""GPU path vs PyTorch path for the whole model (run on a GPU machine).

1. ``small`` in bf16 on the GPU: fla kernels vs the PyTorch KDA path (PRFAAS_DISABLE_FLA), same
   weights: logits of a 2048-token prefill and of 16 decode steps, relative error.
2. ``tiny``: GPU bf16 engine vs CPU fp32 engine, greedy tokens of a few prompts (agreement rate) and
   the logits' relative error on a cache-free forward.

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

from prfaas import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from prfaas.model import kda_ops  # noqa: E402
from prfaas.model.checkpoint import build_model  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_engine(model, prompt, steps, fla: bool) -> list[torch.Tensor]:
    """Logits of the prefill and each decode step through the engine's step path."""
    os.environ["PRFAAS_DISABLE_FLA"] = "0" if fla else "1"
    eng = LLMEngine(
        EngineConfig(
            model="small",
            device="cuda",
            max_num_batched_tokens=len(prompt),
            max_model_len=len(prompt) + steps + 8,
            enable_prefix_cache=False,
            max_num_seqs=2,
            num_blocks=len(prompt) // 16 + 64,
        ),
        model=model,
    )
    captured = []
    orig = eng.model.step

    def spy(*a, **k):
        out = orig(*a, **k)
        captured.append(out[0].detach().float().cpu())
        return out

    eng.model.step = spy  # type: ignore[method-assign]
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    del eng.model.step  # back to the class method (the model is shared between runs)
    os.environ.pop("PRFAAS_DISABLE_FLA", None)
    return captured


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "fla": kda_ops.fla_available()}
    model = build_model("small", device="cuda", dtype=torch.bfloat16, seed=0)
    prompt = [(13 * i + 5) % 250 for i in range(args.tokens)]
    with torch.inference_mode():
        a = run_engine(model, prompt, 16, fla=True)
        b = run_engine(model, prompt, 16, fla=False)
    errs = [rel(x, y) for x, y in zip(a, b, strict=True)]
    res["small_fla_vs_torch"] = {
        "prefill_tokens": args.tokens,
        "prefill_logits_rel_err": errs[0],
        "decode_logits_rel_err_max": max(errs[1:]),
        "argmax_agree": sum(int(x.argmax() == y.argmax()) for x, y in zip(a, b, strict=True))
        / len(a),
    }
    # tiny: GPU bf16 vs CPU fp32
    cpu = build_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    gpu = build_model("tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    ids = torch.tensor([[(7 * i + 1) % 250 for i in range(300)]])
    with torch.inference_mode():
        res["tiny_forward_rel_err_bf16_gpu_vs_fp32_cpu"] = rel(gpu(ids.cuda()).cpu(), cpu(ids))
    agree = []
    for seed in range(4):
        p = [(seed * 31 + 11 * i) % 250 for i in range(40 + 20 * seed)]
        outs = []
        for dev, m in (("cpu", cpu), ("cuda", gpu)):
            e = LLMEngine(EngineConfig(model="tiny", device=dev), model=m)
            e.add_request(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            toks = []
            while e.has_unfinished():
                toks = [o.token_ids for o in e.step()] or toks
            outs.append(toks[0])
        n = next((i for i, (x, y) in enumerate(zip(*outs, strict=True)) if x != y), 16)
        agree.append(n)
    res["tiny_greedy_tokens_identical_prefix_len_of_16"] = agree
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
