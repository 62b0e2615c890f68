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
from prfaas.model.layers import SparseMoE  # noqa: E402

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


def decode_floor(
    cfg: ModelConfig,
    model: torch.nn.Module,
    B: int,
    ctx: int,
    dtype_bytes: int,
    experts_touched: list[int] | None = None,
) -> dict[str, float]:
    """Bytes one decode step must move, by part: the weights it reads (for an MoE, the routed
    experts the batch's tokens chose, ``experts_touched`` per MoE layer, counted on a real step;
    without the counts, the k experts of one token per layer, a lower bound), the embedding rows,
    the MLA latents of the context, and the KDA recurrent (fp32) and conv states read and
    written."""
    expert_numel, other = 0, 0
    for n, p in model.named_parameters():
        if "embed_tokens" in n:
            continue
        if ".experts." in n and ".shared_experts." not in n:
            expert_numel += p.numel()
        else:
            other += p.numel() * p.element_size()
    parts = {"weights": float(other), "embedding_rows": float(B * cfg.hidden_size * dtype_bytes)}
    if cfg.num_experts:
        moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        per_expert = expert_numel / (cfg.num_experts * len(moe_layers))
        touched = experts_touched or [cfg.num_experts_per_token] * len(moe_layers)
        parts["routed_experts"] = float(sum(touched) * per_expert * dtype_bytes)
    parts["mla_kv_read"] = float(B * ctx * cfg.latent_dim * dtype_bytes * len(cfg.mla_layers))
    rec = cfg.kda_num_heads * cfg.kda_head_dim**2 * 4
    conv = 3 * cfg.kda_width * (cfg.short_conv_kernel_size - 1) * dtype_bytes
    parts["kda_state_rw"] = float(2 * B * len(cfg.kda_layers) * (rec + conv))
    parts["total"] = sum(parts.values())
    return parts


def decode_bytes(
    cfg: ModelConfig, model: torch.nn.Module, B: int, ctx: int, dtype_bytes: int
) -> float:
    """The floor's total without expert counts (see :func:`decode_floor`)."""
    return decode_floor(cfg, model, B, ctx, dtype_bytes)["total"]


def measure_ceilings(device: torch.device) -> dict:
    """Measured HBM bandwidth (a 2 GiB device-to-device copy, bytes read + written) and bf16
    matrix rate (8192^3 on random data), medians of 10 after warm-up."""

    def timed(fn, reps: int = 10) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return sorted(ts)[len(ts) // 2]

    t = [torch.empty(1 << 30, dtype=torch.bfloat16, device=device).uniform_() for _ in range(2)]
    bw = 2 * t[0].numel() * 2 / timed(lambda: t[1].copy_(t[0]))
    n = 8192
    t = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2)]
    fl = 2 * n**3 / timed(lambda: t[0] @ t[1])
    t.clear()
    torch.cuda.empty_cache()
    return {"measured_bw": bw, "measured_flops": fl}


def moe_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def kernel_table(prof, rows: int = 15) -> list[dict]:
    """The GPU kernels (and copies) of a torch.profiler run, by total device time, with their
    share of the device time of all of them."""
    from torch.autograd import DeviceType

    agg: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or e.name == "Command Buffer Full":
            continue
        a = agg.setdefault(e.name, [0, 0.0])
        a[0] += 1
        a[1] += e.time_range.elapsed_us()
    total = sum(v[1] for v in agg.values())
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:rows]
    return [
        {"kernel": k[:90], "calls": int(v[0]), "ms": v[1] / 1e3, "share": v[1] / total}
        for k, v in top
    ] + [{"kernel": "TOTAL (all kernels)", "calls": 0, "ms": total / 1e3, "share": 1.0}]


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
    moes = moe_layers(eng.model)
    for m in moes:  # the first decode step's expert choices (graph capture's eager warm-up)
        m.record = []
    for _ in range(2):
        eng.step()  # warm-up decode steps
    eng.experts_touched = [int(torch.unique(m.record[0]).numel()) for m in moes if m.record]
    for m in moes:
        m.record = None
    sync(eng.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(eng.device)
    return (time.perf_counter() - t0) / steps, eng


def plan_row(model, seqs: int, context: int, tokens: int, util: float) -> dict:
    """Memory planning on this device (prfaas.engine.memory_plan): the cache it sizes for
    ``seqs`` slots after a peak forward of ``tokens`` tokens, allocated once to prove it fits."""
    from prfaas.cache.hybrid import CacheConfig, HybridCache
    from prfaas.engine.memory_plan import plan_memory

    base = CacheConfig(block_size=16, num_blocks=1, max_seqs=seqs, checkpoint_interval=64)
    plan = plan_memory(model, base, util, profile_tokens=tokens)
    cache = HybridCache(
        model.config, plan.cache_config, model.lm_head.weight.device, torch.bfloat16
    )
    allocated = torch.cuda.memory_allocated()
    del cache
    torch.cuda.empty_cache()
    per_seq = plan.state_bytes_per_seq + -(-context // 16) * plan.block_bytes
    return {
        "phase": "memory_plan",
        **plan.summary(),
        "allocated_with_cache_bytes": allocated,
        "context": context,
        "seqs_fit_at_context": plan.max_seqs_at(context),
        "seqs_possible_at_context": int(plan.cache_bytes // per_seq),
    }


def _decode_kernels(model, B: int, ctx: int, rows: int) -> list[dict]:
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    eng = LLMEngine(
        model=model,
        config=EngineConfig(
            model=model.config.name,
            cuda_graphs=False,
            async_decode=False,
            max_num_batched_tokens=max(B * ctx, 256),
            max_num_seqs=B,
            max_model_len=ctx + 16,
            enable_prefix_cache=False,
            num_blocks=B * (-(-(ctx + 16) // 16)) + 8,
        ),
    )
    start_decodes(eng, B, ctx, max_tokens=8)
    eng.step()
    sync(eng.device)
    with torch.profiler.profile(activities=acts) as prof:
        eng.step()
        sync(eng.device)
    return kernel_table(prof, rows)


def breakdown(model, batches: list[int], ctx: int, T: int, rows: int) -> dict:
    """Per-kernel device time (torch.profiler) of one decode step (batch B, context ctx, the
    eager static-shape decode: the kernels a graph replays) and of one prefill of T tokens."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    out = {}
    for B in batches:
        out[f"decode_b{B}_ctx{ctx}"] = _decode_kernels(model, B, ctx, rows)
    eng = LLMEngine(
        model=model,
        config=EngineConfig(
            model=model.config.name,
            max_num_batched_tokens=T,
            max_model_len=T + 8,
            max_num_seqs=2,
            enable_prefix_cache=False,
            num_blocks=-(-(T + 8) // 16) + 8,
        ),
    )
    for r in range(2):
        eng.add_request([(7 * i + r) % 250 for i in range(T)], SamplingParams(max_tokens=1))
        sync(eng.device)
        if r:
            with torch.profiler.profile(activities=acts) as prof:
                eng.step()
                sync(eng.device)
        else:
            eng.step()
        while eng.has_unfinished():
            eng.step()
    out[f"prefill_{T}"] = kernel_table(prof, rows)
    del eng
    return out


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
    ap.add_argument(
        "--only-async", action="store_true", help="time decode only with async_decode (graphs)"
    )
    ap.add_argument(
        "--plan",
        type=int,
        nargs=2,
        metavar=("SEQS", "CONTEXT"),
        default=None,
        help="GPU: size the cache by memory planning for SEQS slots and report what fits",
    )
    ap.add_argument("--breakdown", action="store_true", help="GPU: per-kernel profiler tables")
    args = ap.parse_args()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    prefill = args.prefill if args.prefill is not None else ([8192, 32768] if gpu else [512, 2048])
    batches = args.batches or ([1, 32, 128] if gpu else [1, 8, 32])
    ctx = args.ctx or (1024 if gpu else 128)
    steps = args.steps or (20 if gpu else 8)
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    cfg_kw = {"model": args.model, "device": args.device}
    device = torch.device("cuda" if gpu else "cpu")
    t0 = time.perf_counter()
    model = build_model(args.model, device, torch.bfloat16 if gpu else torch.float32)
    sync(device)
    build_s = time.perf_counter() - t0
    info = device_info(device)
    info["model_build_s"] = build_s
    info["parameters"] = model.num_parameters()
    if gpu:
        info.update(measure_ceilings(device))
        info["weights_bytes"] = torch.cuda.memory_allocated()
    print(json.dumps(info), flush=True)
    rows = []
    if gpu and args.plan:
        row = plan_row(model, args.plan[0], args.plan[1], 8192, 0.9)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for T in prefill:
        dt, eng = bench_prefill(cfg_kw, T, reps=2, model=model)
        n_lin = linear_params(eng.model_config, eng.model)
        fl = prefill_flops(eng.model_config, n_lin, T)
        row = {
            "phase": "prefill",
            "tokens": T,
            "seconds": dt,
            "tokens_per_s": T / dt,
            "tflops": fl / dt / 1e12,
            "flops": fl,
            "device": info["device"],
        }
        if info["peak_flops"]:
            row["frac_peak_flops"] = fl / dt / info["peak_flops"]
        if info.get("measured_flops"):
            row["frac_measured_peak_flops"] = fl / dt / info["measured_flops"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del eng
    modes = [(True, False)] + [(False, False)] * args.eager + [(True, True)] * args.async_decode
    if args.only_async:
        modes = [(True, True)]
    for B in batches:
        for graphs, pipelined in modes:
            dt, eng = bench_decode(
                cfg_kw, B, ctx, steps, model=model, graphs=graphs, async_decode=pipelined
            )
            touched = getattr(eng, "experts_touched", None) or None
            floor = decode_floor(eng.model_config, eng.model, B, ctx, eng.dtype.itemsize, touched)
            by = floor["total"]
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
                "floor_bytes": floor,
                "experts_touched": touched,
                "device": info["device"],
            }
            if info["peak_bw"]:
                row["frac_hbm_roofline"] = by / dt / info["peak_bw"]
            if info.get("measured_bw"):
                row["floor_s"] = by / info["measured_bw"]
                row["frac_floor"] = row["floor_s"] / dt
            if eng.runner.graphs is not None and len(eng.runner.graphs):
                # the graph replay alone: the GPU's share of the step, without the host's
                gdt = eng.runner.graphs.replay_seconds(*eng.runner.graphs.buckets()[-1], steps)
                row["gpu_step_s"] = gdt
                if info["peak_bw"]:
                    row["frac_hbm_roofline_gpu"] = by / gdt / info["peak_bw"]
                if info.get("measured_bw"):
                    row["frac_floor_gpu"] = row["floor_s"] / gdt
            rows.append(row)
            print(json.dumps(row), flush=True)
            del eng
    kernels = None
    if gpu and args.breakdown:
        kernels = breakdown(
            model,
            sorted({min(batches), max(batches)}),
            ctx,
            32768 if 32768 in prefill else 8192,
            15,
        )
    dev = "cuda" if gpu else "cpu"
    result = {
        "model": args.model,
        "machine": info,
        "torch": torch.__version__,
        "command": "python benchmarks/engine.py " + " ".join(sys.argv[1:]),
        "rows": rows,
        "kernels": kernels,
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
    ]
    if info.get("measured_bw"):
        lines += [
            f"Measured ceilings: copy {info['measured_bw'] / 1e12:.2f} TB/s, bf16 GEMM "
            f"{info['measured_flops'] / 1e12:.0f} TFLOP/s (vendor: "
            f"{info['peak_bw'] / 1e12:.1f} TB/s, {info['peak_flops'] / 1e12:.0f} TFLOP/s). "
            f"Model: {info['parameters'] / 1e9:.2f}B parameters built on the device in "
            f"{info['model_build_s']:.1f} s, {info['weights_bytes'] / 2**30:.1f} GiB.",
            "",
        ]
    lines += [
        "| phase | size | time | tokens/s | achieved | fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["phase"] == "memory_plan":
            continue
        if r["phase"] == "prefill":
            frac = f"{r['frac_peak_flops']:.1%} of bf16 FLOP/s" if "frac_peak_flops" in r else "-"
            if "frac_measured_peak_flops" in r:
                frac += f" ({r['frac_measured_peak_flops']:.1%} of measured)"
            lines.append(
                f"| prefill | {r['tokens']} tokens | {r['seconds'] * 1e3:.1f} ms | "
                f"{r['tokens_per_s']:.0f} | {r['tflops']:.2f} TFLOP/s | {frac} |"
            )
        else:
            frac = f"{r['frac_hbm_roofline']:.1%} of HBM" if "frac_hbm_roofline" in r else "-"
            if "frac_floor" in r:
                frac += f"; {r['frac_floor']:.1%} of the floor at measured bw"
            if "frac_hbm_roofline_gpu" in r:
                frac += f" (GPU replay alone: {r['gpu_step_s'] * 1e3:.2f} ms"
                if "frac_floor_gpu" in r:
                    frac += f", {r['frac_floor_gpu']:.1%} of the floor"
                frac += ")"
            mode = "graphs" if r.get("cuda_graphs") else "eager"
            if r.get("async_decode"):
                mode += ", async"
            lines.append(
                f"| decode ({mode}) | batch {r['batch']}, ctx {r['context']} | "
                f"{r['step_s'] * 1e3:.2f} ms/step | "
                f"{r['tokens_per_s']:.0f} | {r['gbytes_per_s']:.1f} GB/s | {frac} |"
            )
    for r in rows:
        if r["phase"] == "decode" and r.get("experts_touched"):
            fb = r["floor_bytes"]
            lines.append(
                f"\nDecode floor, batch {r['batch']}: "
                + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in fb.items())
                + f"; routed experts touched per MoE layer: mean "
                f"{sum(r['experts_touched']) / len(r['experts_touched']):.1f} of "
                f"{model.config.num_experts}"
            )
    for r in rows:
        if r["phase"] == "memory_plan":
            cc = r["cache_config"]
            lines.append(
                f"\nMemory plan (gpu_memory_utilization {r['utilization']}): weights "
                f"{r['weights_bytes'] / 2**30:.1f} GiB, peak forward of {r['profile_tokens']} "
                f"tokens {r['peak_forward_bytes'] / 2**30:.2f} GiB, cache "
                f"{r['cache_bytes'] / 2**30:.1f} GiB: {cc['max_seqs']} state slots, "
                f"{cc['num_checkpoints']} checkpoints, {cc['num_blocks']} blocks "
                f"({r['num_tokens']} tokens); at context {r['context']}: "
                f"{r['seqs_fit_at_context']} sequences with these slots, "
                f"{r['seqs_possible_at_context']} if every byte went to slots and blocks"
            )
    for name, table in (kernels or {}).items():
        lines += ["", f"Kernels of one {name} step (torch.profiler, device time):", ""]
        lines += ["| kernel | calls | ms | share |", "|---|---|---|---|"]
        lines += [
            f"| `{k['kernel']}` | {k['calls']} | {k['ms']:.3f} | {k['share']:.1%} |" for k in table
        ]
    (out / f"engine_{args.model}_{dev}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
