"""Where the bf16 logit noise of the PyTorch path comes from, on the CPU (no GPU needed).

The 48B geometry cut down to fit a small machine: hidden 2304, KDA 32 x 128, MLA 32 heads
(kv_lora_rank 512, 128 + 64 head dims), the vocabulary of 163840, ``--layers`` layers (KDA, with MLA
at layer 3, MoE from layer 1) but ``--experts`` routed experts (top-8, one shared). Random weights,
one copy in fp32 (the reference) and one in bf16 holding the same values. Teacher-forced: each
prompt's prefill, then ``--steps`` single-token decode steps through the paged cache
(``benchmarks.gpu_check_model.forced_logits``), every run's experts forced to the fp32 run's
choices (``RouterProbe``: random routers have near-ties everywhere, so unforced runs differ in
choices, not arithmetic).

Variants of the bf16 run, each against the fp32 reference: the residual stream in bf16 or fp32
(``HybridForCausalLM.residual_dtype``), logits from a bf16 GEMM or one with fp32 output
(``fp32_logits``), and, for attribution, the MoE, KDA or MLA layers computed in fp32 (the fp32
model's modules, fed the bf16 run's inputs, their outputs handed back in bf16) on top of the new
defaults.

    python benchmarks/precision_cpu.py --out benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check_model import forced_logits  # noqa: E402
from benchmarks.gpu_check_moe import (  # noqa: E402
    RouterProbe,
    agreement_ci,
    twin_models_and_prompts,
)
from prfaas.model.config import PRESETS  # noqa: E402


class _Up(nn.Module):
    """A module of the fp32 model called with the bf16 run's input upcast (its output as is:
    the bf16 model's code narrows it where it stores it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float())


class _KDA32(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, state, conv_state):
        o, st, cv = self.inner(x.float(), state, conv_state)
        return o.to(x.dtype), st, cv


class _MLA32(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.o_proj = _Up(inner.o_proj)

    def latent(self, h, pos):
        return self.inner.latent(h.float(), pos)

    def queries(self, h, pos):
        return self.inner.queries(h.float(), pos)

    def attend_expanded(self, q_nope, q_pe, lat, start):
        return self.inner.attend_expanded(q_nope, q_pe, lat.float(), start)

    def attend_absorbed(self, q_nope, q_pe, lat, lengths):
        return self.inner.attend_absorbed(q_nope, q_pe, lat.float(), lengths)


class _MoE32(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.float()).to(x.dtype)


def swap_fp32(model, model32, parts: set[str]) -> list:
    """Put the fp32 model's ``parts`` ("moe", "kda", "mla") into the bf16 model; returns what
    ``restore`` needs."""
    saved = []
    for layer, l32 in zip(model.model.layers, model32.model.layers, strict=True):
        if "moe" in parts:  # the MoE layers' experts and the dense MLP of layer 0
            name = "block_sparse_moe" if hasattr(layer, "block_sparse_moe") else "mlp"
            saved.append((layer, name, getattr(layer, name)))
            setattr(layer, name, _MoE32(getattr(l32, name)))
        if layer.kind in parts:
            saved.append((layer, "self_attn", layer.self_attn))
            wrap = _KDA32 if layer.kind == "kda" else _MLA32
            layer.self_attn = wrap(l32.self_attn)
    return saved


def restore(saved: list) -> None:
    for layer, name, mod in saved:
        setattr(layer, name, mod)


def stats(runs: list[list[torch.Tensor]], refs: list[list[torch.Tensor]]) -> dict:
    """Over every decode step of every prompt: rel. L2 error, the largest |logit - reference|
    (median over steps), argmax agreement with its 95% interval; the prefill's rel. error."""
    rel, mx, rms, agree, pre = [], [], [], 0, []
    n = 0
    for run, ref in zip(runs, refs, strict=True):
        for i, (a, r) in enumerate(zip(run, ref, strict=True)):
            d = a - r
            e = float(d.norm() / r.norm())
            if i == 0:
                pre.append(e)
                continue
            rel.append(e)
            mx.append(float(d.abs().max()))
            rms.append(float(d.pow(2).mean().sqrt()))
            agree += int(a.argmax() == r.argmax())
            n += 1
    med = sorted(mx)[len(mx) // 2]
    return {
        "prefill_rel_err": sum(pre) / len(pre),
        "decode_rel_err_mean": sum(rel) / len(rel),
        "decode_max_abs_err_median": med,
        "decode_rms_err_mean": sum(rms) / len(rms),
        "steps": n,
        **agreement_ci(agree, n),
    }


VARIANTS = {
    # name: (residual_dtype, fp32_logits, parts computed in fp32)
    "bf16 stream, bf16 logits (before)": (None, False, ()),
    "bf16 stream, fp32 logits": (None, True, ()),
    "fp32 stream, bf16 logits": (torch.float32, False, ()),
    "fp32 stream, fp32 logits (now)": (torch.float32, True, ()),
    "now + MLPs in fp32": (torch.float32, True, ("moe",)),
    "now + KDA in fp32": (torch.float32, True, ("kda",)),
    "now + MLA in fp32": (torch.float32, True, ("mla",)),
    "now + MLPs, KDA, MLA in fp32": (torch.float32, True, ("moe", "kda", "mla")),
    # the layers' inputs (the norms' outputs) in fp32 too: only the bf16 cache (MLA latents,
    # KDA conv inputs) and the bf16-rounded layer outputs are left
    "now + all layers and their inputs in fp32": (torch.float32, True, ("moe", "kda", "mla", "in")),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="the tiny preset's dims (a quick check)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = PRESETS["tiny" if args.tiny else "kimi-linear-48b"]
    cfg = dataclasses.replace(
        base,
        num_hidden_layers=args.layers,
        full_attn_layers=(3,) if args.layers > 3 else (),
        num_experts=args.experts,
        num_experts_per_token=min(base.num_experts_per_token, args.experts),
        name=f"48b-geometry-{args.layers}l-{args.experts}e",
    )
    t0 = time.time()
    model, model32, prompts = twin_models_and_prompts(
        cfg, "cpu", args.prompts, args.prefill + args.steps
    )
    res: dict = {
        "machine": "cpu",
        "torch": torch.__version__,
        "config": {
            "hidden": cfg.hidden_size,
            "layers": cfg.layer_kinds,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_token,
            "vocab": cfg.vocab_size,
        },
        "prompts": args.prompts,
        "prefill": args.prefill,
        "steps": args.steps,
        "variants": {},
    }
    refs, forced = [], []
    for toks in prompts:
        probe = RouterProbe(model32)
        try:
            refs.append(forced_logits(model32, toks, args.prefill, False))
        finally:
            probe.remove()
        forced.append(probe.ids)
    top2 = [float(v[0] - v[1]) for ref in refs for r in ref[1:] for v in [r.topk(2).values]]
    res["reference_top2_margin_median"] = sorted(top2)[len(top2) // 2]
    res["reference_logit_abs_median"] = float(torch.stack(refs[0][1:]).abs().median())
    print(json.dumps(res), flush=True)
    for name in args.variants:
        rdt, fp32_logits, parts = VARIANTS[name]
        model.residual_dtype, model.fp32_logits = rdt, fp32_logits
        saved = swap_fp32(model, model32, set(parts))
        if "in" in parts:
            model.dtypes = lambda: (torch.float32, torch.float32)
        try:
            runs = []
            for toks, ids in zip(prompts, forced, strict=True):
                probe = RouterProbe(model, ids)
                try:
                    runs.append(forced_logits(model, toks, args.prefill, False))
                finally:
                    probe.remove()
        finally:
            restore(saved)
            model.__dict__.pop("dtypes", None)
        res["variants"][name] = stats(runs, refs)
        print(json.dumps({name: res["variants"][name]}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    res["seconds"] = time.time() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
