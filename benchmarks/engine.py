"""Engine benchmark: prefill and decode tokens/s, with the fraction of the device's peak FLOP/s and
HBM bandwidth each reaches (a benchmark, not a test).

    python benchmarks/engine.py --model tiny                 # CPU
    python benchmarks/engine.py --model small --device cuda  # GPU: prefill 8K/32K, decode batch 1/32/128

Writes benchmarks/results/engine_<model>_<device>.json and .md.
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

from benchmarks.machine import cpu_model  # noqa: E402
from prfaas import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from prfaas.model import kda_ops  # noqa: E402
from prfaas.model.checkpoint import build_model  # noqa: E402
from prfaas.model.config import ModelConfig  # noqa: E402

# dense bf16 peak FLOP/s and HBM bytes/s (SXM parts, vendor figures)
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAKS.items() if k in name), (None, None))
        return {
            "device": name,
            "peak_flops": peak[0],
            "peak_bw": peak[1],
            "fla": kda_ops.fla_available(),
        }
    cpu = cpu_model()
    return {"device": f"{cpu} ({os.cpu_count()} cores)", "peak_flops": None, "peak_bw": None}


def linear_params(cfg: ModelConfig, model: torch.nn.Module) -> int:
    """Parameters used per token in matmuls (embedding lookup excluded, active experts only)."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.dim() < 2 or "conv1d" in name:
            continue
        if ".experts." in name:
            total += p.numel() * cfg.num_experts_per_token / max(cfg.num_experts, 1)
        else:
            total += p.numel()
    return int(total)


def prefill_flops(cfg: ModelConfig, n_lin: int, T: int) -> float:
    lm_head = cfg.vocab_size * cfg.hidden_size
    f = 2 * (n_lin - lm_head) * T + 2 * lm_head  # logits only for the last token
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    f += len(cfg.mla_layers) * 2 * cfg.num_attention_heads * (T * T / 2) * (qk + v)
    K = cfg.kda_head_dim
    f += len(cfg.kda_layers) * cfg.kda_num_heads * T * 6 * K * K  # chunked delta rule, approx.
    return f


def decode_bytes(
    cfg: ModelConfig, model: torch.nn.Module, B: int, ctx: int, dtype_bytes: int
) -> float:
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.num_experts:
        weights = linear_params(cfg, model)  # lower bound: only active experts
    kv = B * ctx * cfg.latent_dim * dtype_bytes * len(cfg.mla_layers)
    state = (
        B * len(cfg.kda_layers) * cfg.kda_num_heads * cfg.kda_head_dim**2 * 4 * 2
    )  # read + write
    return weights * dtype_bytes + kv + state


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_prefill(cfg_kw: dict, T: int, reps: int, model=None) -> tuple[float, LLMEngine]:
    eng = LLMEngine(
        model=model,
        config=EngineConfig(
            **cfg_kw,
            max_num_batched_tokens=T,
            max_model_len=T + 8,
            max_num_seqs=2,
            enable_prefix_cache=False,
            num_blocks=-(-(T + 8) // 16) * 2 + 8,
        ),
    )
    times = []
    for r in range(reps + 1):
        prompt = [(7 * i + r) % 250 for i in range(T)]
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        sync(eng.device)
        t0 = time.perf_counter()
        eng.step()
        sync(eng.device)
        if r:  # first run warms up
            times.append(time.perf_counter() - t0)
        while eng.has_unfinished():
            eng.step()
    return min(times), eng


def start_decodes(eng: LLMEngine, B: int, ctx: int, max_tokens: int) -> None:
    """Add ``B`` greedy requests with ``ctx``-token prompts and run their prefills, so that the
    next steps are decode-only steps of all ``B`` rows."""
    for b in range(B):
        eng.add_request(
            [(b + 3 * i) % 250 for i in range(ctx)],
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        )
    while (st := eng.stats()).prefilling or st.waiting:
        eng.step()


def bench_decode(
    cfg_kw: dict,
    B: int,
    ctx: int,
    steps: int,
    model=None,
    graphs: bool = True,
    async_decode: bool = False,
) -> tuple[float, LLMEngine]:
    eng = LLMEngine(
        model=model,
        config=EngineConfig(
            cuda_graphs=graphs,
            async_decode=async_decode,
            **cfg_kw,
            max_num_batched_tokens=max(B * ctx, 256),
            max_num_seqs=B,
            max_model_len=ctx + steps + 8,
            enable_prefix_cache=False,
            num_blocks=B * (-(-(ctx + steps + 8) // 16)) + 8,
        ),
    )
    start_decodes(eng, B, ctx, max_tokens=steps + 2)
    for _ in range(2):
        eng.step()  # warm-up decode steps
    sync(eng.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(eng.device)
    return (time.perf_counter() - t0) / steps, eng


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prefill", type=int, nargs="*", default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--ctx", type=int, default=None, help="decode context length")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--eager", action="store_true", help="also time decode without CUDA graphs")
    ap.add_argument(
        "--async-decode",
        action="store_true",
        help="also time decode with EngineConfig.async_decode (host work overlapping the GPU's)",
    )
    args = ap.parse_args()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    prefill = args.prefill or ([8192, 32768] if gpu else [512, 2048])
    batches = args.batches or ([1, 32, 128] if gpu else [1, 8, 32])
    ctx = args.ctx or (1024 if gpu else 128)
    steps = args.steps or (20 if gpu else 8)
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    cfg_kw = {"model": args.model, "device": args.device}
    device = torch.device("cuda" if gpu else "cpu")
    model = build_model(args.model, device, torch.bfloat16 if gpu else torch.float32)
    rows = []
    info = None
    for T in prefill:
        dt, eng = bench_prefill(cfg_kw, T, reps=2, model=model)
        info = info or device_info(eng.device)
        n_lin = linear_params(eng.model_config, eng.model)
        fl = prefill_flops(eng.model_config, n_lin, T)
        row = {
            "phase": "prefill",
            "tokens": T,
            "seconds": dt,
            "tokens_per_s": T / dt,
            "tflops": fl / dt / 1e12,
        }
        if info["peak_flops"]:
            row["frac_peak_flops"] = fl / dt / info["peak_flops"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del eng
    modes = [(True, False)] + [(False, False)] * args.eager + [(True, True)] * args.async_decode
    for B in batches:
        for graphs, pipelined in modes:
            dt, eng = bench_decode(
                cfg_kw, B, ctx, steps, model=model, graphs=graphs, async_decode=pipelined
            )
            info = info or device_info(eng.device)
            by = decode_bytes(eng.model_config, eng.model, B, ctx, eng.dtype.itemsize)
            row = {
                "phase": "decode",
                "batch": B,
                "context": ctx,
                "cuda_graphs": eng.runner.graphs is not None,
                "async_decode": pipelined,
                "step_s": dt,
                "tokens_per_s": B / dt,
                "gbytes_per_s": by / dt / 1e9,
                "roofline_bytes": by,
            }
            if info["peak_bw"]:
                row["frac_hbm_roofline"] = by / dt / info["peak_bw"]
            if eng.runner.graphs is not None and len(eng.runner.graphs):
                # the graph replay alone: the GPU's share of the step, without the host's
                gdt = eng.runner.graphs.replay_seconds(*eng.runner.graphs.buckets()[-1], steps)
                row["gpu_step_s"] = gdt
                if info["peak_bw"]:
                    row["frac_hbm_roofline_gpu"] = by / gdt / info["peak_bw"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del eng
    dev = "cuda" if gpu else "cpu"
    result = {
        "model": args.model,
        "machine": info,
        "torch": torch.__version__,
        "rows": rows,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"engine_{args.model}_{dev}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Engine benchmark: `{args.model}` on {info['device']}",
        "",
        f"torch {torch.__version__}; fla kernels: {info.get('fla', False)}; "
        f"command: `python benchmarks/engine.py {' '.join(sys.argv[1:])}`",
        "",
        "| phase | size | time | tokens/s | achieved | fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["phase"] == "prefill":
            frac = f"{r['frac_peak_flops']:.1%} of bf16 FLOP/s" if "frac_peak_flops" in r else "-"
            lines.append(
                f"| prefill | {r['tokens']} tokens | {r['seconds'] * 1e3:.1f} ms | "
                f"{r['tokens_per_s']:.0f} | {r['tflops']:.2f} TFLOP/s | {frac} |"
            )
        else:
            frac = f"{r['frac_hbm_roofline']:.1%} of HBM" if "frac_hbm_roofline" in r else "-"
            if "frac_hbm_roofline_gpu" in r:
                frac += (
                    f" (GPU replay alone: {r['gpu_step_s'] * 1e3:.2f} ms, "
                    f"{r['frac_hbm_roofline_gpu']:.1%})"
                )
            mode = "graphs" if r.get("cuda_graphs") else "eager"
            if r.get("async_decode"):
                mode += ", async"
            lines.append(
                f"| decode ({mode}) | batch {r['batch']}, ctx {r['context']} | "
                f"{r['step_s'] * 1e3:.2f} ms/step | "
                f"{r['tokens_per_s']:.0f} | {r['gbytes_per_s']:.1f} GB/s | {frac} |"
            )
    (out / f"engine_{args.model}_{dev}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
