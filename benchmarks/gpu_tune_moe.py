"""Tuning and measuring the MoE kernels of prfaas.model.moe_kernels on a GPU (48B geometry, bf16,
random weights; run on a GPU machine, a benchmark, not a test).

1. ``decode``: one decode step's 26 MoE layers captured in a CUDA graph (4 sets of layer weights
   in rotation, so each layer's experts come from HBM, not L2) at 1..8 tokens: the previous path
   (torch router: fp32 copy of x, GEMV, sigmoid, top-k, gather, renormalise; per-pair GEMV for gate|up,
   SiLU-mul, per-pair GEMV for down, combine; the shared expert as three more kernels) against the
   fused one (router in two kernels; two per-pair kernels with the shared expert inside), then a
   sweep of the per-pair kernels' blocks and launch options and of the router GEMV's. Reports
   each kernel's bytes over its time.
2. ``grouped``: the permuted path's grouped GEMMs, ``torch._grouped_mm`` against the Triton
   grouped GEMM (rows gathered in the kernel, SiLU and the routing weight in the epilogue) at
   128 .. 32768 tokens, a few tile configurations each; relative error against the first.

    python benchmarks/gpu_tune_moe.py --out /tmp/out/tune.json

Writes JSON; prints one line per measurement and a summary last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas.model import moe_grouped, moe_kernels, moe_ops, moe_pairs  # noqa: E402
from prfaas.model.config import PRESETS  # noqa: E402


def graph_ms(fn, reps: int = 15) -> float:
    """Median device time of one replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    del g
    return sorted(ts)[len(ts) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


class Layers:
    """``sets`` MoE layers' weights of the 48B geometry, bf16 (router fp32), on the GPU."""

    def __init__(self, sets: int, dev: str = "cuda") -> None:
        cfg = PRESETS["kimi-linear-48b"]
        self.cfg = cfg
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size  # noqa: E741
        g = torch.Generator(device=dev).manual_seed(0)
        bf = torch.bfloat16

        def rnd(*shape, scale):
            return (torch.randn(*shape, device=dev, generator=g) * scale).to(bf)

        self.w13 = [rnd(E, 2 * I, H, scale=H**-0.5) for _ in range(sets)]
        self.w2 = [rnd(E, H, I, scale=I**-0.5) for _ in range(sets)]
        self.s13 = [rnd(2 * I, H, scale=H**-0.5) for _ in range(sets)]
        self.s2 = [rnd(H, I, scale=I**-0.5) for _ in range(sets)]
        self.gate = [torch.randn(E, H, device=dev, generator=g) * H**-0.5 for _ in range(sets)]
        self.bias = [torch.randn(E, device=dev, generator=g) * 0.01 for _ in range(sets)]
        self.k = cfg.num_experts_per_token
        self.scaling = cfg.routed_scaling_factor
        self.renorm = cfg.moe_renormalize
        self.sets = sets
        self.expert_bytes = 3 * I * H * 2

    def route_torch(self, x, i):
        scores = torch.sigmoid(F.linear(x.float(), self.gate[i].float()))
        idx = torch.topk(scores + self.bias[i], self.k, dim=-1, sorted=True).indices
        w = scores.gather(-1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx

    def route_fused(self, x, i):
        return moe_ops.route(x, self.gate[i], self.bias[i], self.k, self.renorm, self.scaling)

    def old_layer(self, x, i):
        w, idx = self.route_torch(x, i)
        shared = moe_ops.shared_mlp(x, self.s13[i], self.s2[i])
        ids = idx.reshape(-1)
        h = moe_pairs.pair_gemv(x, ids, self.w13[i], div=self.k)
        a = moe_ops.silu_mul_scaled(h, w.reshape(-1).float())
        return moe_ops.combine(
            moe_pairs.pair_gemv(a, ids, self.w2[i], div=1), None, self.k, shared, x.dtype
        )

    def new_layer(self, x, i):
        w, idx = self.route_fused(x, i)
        return moe_pairs.pair_experts(x, w, idx, self.w13[i], self.w2[i], (self.s13[i], self.s2[i]))


def decode_part(res: dict, n_layers: int, deadline: float) -> None:
    L = Layers(4)
    cfg = L.cfg
    H, I = cfg.hidden_size, cfg.moe_intermediate_size  # noqa: E741
    g = torch.Generator(device="cuda").manual_seed(1)
    out: dict = {"layers_per_step": n_layers}
    res["decode"] = out
    xs = {T: torch.randn(T, H, device="cuda", generator=g).bfloat16() for T in (1, 2, 4, 8)}

    def step(layer_fn, x):
        def run():
            for i in range(n_layers):
                layer_fn(x, i % L.sets)

        return run

    # correctness: the fused layer against the previous one, same routing
    for T, x in xs.items():
        w, idx = L.route_torch(x, 0)
        w2, idx2 = L.route_fused(x, 0)
        same = bool(torch.equal(idx, idx2))
        got = moe_pairs.pair_experts(x, w, idx, L.w13[0], L.w2[0], (L.s13[0], L.s2[0]))
        ref = L.old_layer(x, 0)
        out[f"check_T{T}"] = {
            "router_same_experts": same,
            "router_weights_max_abs_diff": float((w - w2).abs().max()),
            "fused_vs_previous_rel": rel(got, ref),
        }
        print(json.dumps({f"check_T{T}": out[f"check_T{T}"]}), flush=True)
    # whole MoE of a step: previous vs fused (default configs)
    for T, x in xs.items():
        t_old = graph_ms(step(L.old_layer, x))
        t_new = graph_ms(step(L.new_layer, x))
        _, idx = L.route_torch(x, 0)
        touched = int(torch.unique(idx).numel()) + 1
        moved = n_layers * touched * L.expert_bytes
        out[f"step_T{T}"] = {
            "previous_ms": t_old,
            "fused_ms": t_new,
            "expert_bytes": moved,
            "fused_tb_per_s": moved / t_new / 1e9,
        }
        print(json.dumps({f"step_T{T}": out[f"step_T{T}"]}), flush=True)
    # router alone
    x = xs[1]
    out["router_torch_ms"] = graph_ms(lambda: [L.route_torch(x, i % 4) for i in range(n_layers)])
    sweep = []
    for be, bk, nw in itertools.product((2, 4, 8, 16), (256, 512), (2, 4)):
        if time.time() > deadline:
            break
        moe_ops.ROUTER_CONFIG = {"BE": be, "BK": bk, "num_warps": nw}
        ms = graph_ms(lambda: [L.route_fused(x, i % 4) for i in range(n_layers)])
        sweep.append({"BE": be, "BK": bk, "num_warps": nw, "ms": ms})
    best = min(sweep, key=lambda r: r["ms"])
    moe_ops.ROUTER_CONFIG = {k: best[k] for k in ("BE", "BK", "num_warps")}
    out["router_sweep"] = sorted(sweep, key=lambda r: r["ms"])[:6]
    print(json.dumps({"router_torch_ms": out["router_torch_ms"], "best": best}), flush=True)
    # per-pair kernels alone, at T = 1 (sweep), then the best at 1..8
    ids = {T: L.route_torch(xx, 0)[1] for T, xx in xs.items()}
    k = L.k

    def gate_up_run(T, c):
        x = xs[T]
        P = T * k
        a = torch.empty(P + T, I, device="cuda", dtype=torch.bfloat16)
        scale = torch.rand(P, device="cuda")
        idv = [ids[T].reshape(-1)] * 4

        def run():
            for i in range(n_layers):
                j = i % 4
                moe_kernels.pair_gate_up_kernel[(P + T, triton.cdiv(I, c["BN"]))](
                    x, idv[j], scale, L.w13[j], L.s13[j], a, P, INTER=I, H=H, DIV=k, **c
                )

        return run

    def down_run(T, c):
        P = T * k
        a = torch.randn(P + T, I, device="cuda").bfloat16()
        o = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        idv = ids[T].reshape(-1)

        def run():
            for i in range(n_layers):
                j = i % 4
                moe_kernels.pair_down_kernel[(T, triton.cdiv(H, c["BN"]))](
                    a, idv, L.w2[j], L.s2[j], o, P, H, INTER=I, KTOP=k, HAS_SHARED=True, **c
                )

        return run

    for name, run_of, acc_rows in (("gate_up", gate_up_run, 2), ("down", down_run, 1)):
        sweep = []
        for bn, bk, (nw, ns) in itertools.product(
            (4, 8, 16, 32), (128, 256, 512), ((4, 2), (4, 3), (4, 4), (8, 3), (2, 3))
        ):
            if acc_rows * bn * bk > 64 * 32 * nw or time.time() > deadline:
                continue
            c = {"BN": bn, "BK": bk, "num_warps": nw, "num_stages": ns}
            try:
                ms = graph_ms(run_of(1, c))
            except Exception as e:  # noqa: BLE001 (a config the compiler refuses)
                print(json.dumps({name: c, "error": repr(e)[:200]}), flush=True)
                continue
            moved = n_layers * (k + 1) * L.expert_bytes * (2 / 3 if name == "gate_up" else 1 / 3)
            sweep.append({**c, "ms": ms, "tb_per_s": moved / ms / 1e9})
        sweep.sort(key=lambda r: r["ms"])
        if not sweep:
            continue
        best = {key: sweep[0][key] for key in ("BN", "BK", "num_warps", "num_stages")}
        out[f"{name}_sweep_T1"] = sweep[:8]
        out[f"{name}_default"] = dict(moe_pairs.PAIR_CONFIG[name])
        out[f"{name}_best"] = best
        out[f"{name}_best_by_T"] = {T: graph_ms(run_of(T, best)) for T in (1, 2, 4, 8)}
        moe_pairs.PAIR_CONFIG[name] = best
        print(json.dumps({name: sweep[:5], "by_T": out[f"{name}_best_by_T"]}), flush=True)
    for T, x in xs.items():  # the whole step again with the tuned configs
        t_new = graph_ms(step(L.new_layer, x))
        out[f"step_T{T}"]["fused_tuned_ms"] = t_new
        out[f"step_T{T}"]["fused_tuned_tb_per_s"] = out[f"step_T{T}"]["expert_bytes"] / t_new / 1e9
    out["tuned"] = {"router": moe_ops.ROUTER_CONFIG, "pair": moe_pairs.PAIR_CONFIG}
    print(json.dumps({"tuned": out["tuned"]}), flush=True)
    torch.cuda.empty_cache()


def grouped_part(res: dict, tokens: list[int], deadline: float, sweep_small: bool = False) -> None:
    L = Layers(1)
    H = L.cfg.hidden_size
    g = torch.Generator(device="cuda").manual_seed(2)
    out: dict = {}
    res["grouped"] = out
    configs = [
        {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
        {"BM": 16, "BN": 128, "BK": 128, "num_warps": 4, "num_stages": 3},
        {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3},
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 256, "BK": 64, "num_warps": 8, "num_stages": 4},
    ]
    for T in tokens:
        if time.time() > deadline:
            break
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        w, idx = L.route_torch(x, 0)

        def ref_run(x=x, w=w, idx=idx):
            moe_ops.GROUPED_IMPL = "grouped_mm"
            return moe_ops.experts_forward(x, w, idx, L.w13[0], L.w2[0])

        ref = ref_run()
        row = {"grouped_mm_ms": graph_ms(ref_run, reps=10), "triton": []}
        touched = int(torch.unique(idx).numel())
        flops = 2 * T * L.k * 3 * L.cfg.moe_intermediate_size * H
        small = T * L.k <= 2048
        cands = configs
        if small and sweep_small:  # decode sizes: a wider sweep
            cands = [
                {"BM": bm, "BN": bn, "BK": bk, "num_warps": nw, "num_stages": ns}
                for bm, bn, bk, (nw, ns) in itertools.product(
                    (16, 32), (64, 128), (128, 256), ((4, 3), (4, 4), (8, 3), (8, 4))
                )
                if not (bm == 32 and bk == 256)
            ]
        for c in cands:
            if time.time() > deadline:
                break
            if small and c["BM"] > 32 or not small and c["BM"] < 64:
                continue

            def run(c=c, x=x, w=w, idx=idx):
                y = moe_grouped.fused_experts(x, w, idx, L.w13[0], L.w2[0], config=c)
                return moe_ops.combine(y, None, L.k, None, x.dtype)

            try:
                err = rel(run(), ref)
                ms = graph_ms(run, reps=10)
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"T": T, "config": c, "error": repr(e)[:300]}), flush=True)
                continue
            row["triton"].append({**c, "ms": ms, "rel_err_vs_grouped_mm": err})
        row["triton"].sort(key=lambda r: r["ms"])
        row["experts_touched"] = touched
        row["tflops_grouped_mm"] = flops / row["grouped_mm_ms"] / 1e9
        if row["triton"]:
            row["tflops_triton_best"] = flops / row["triton"][0]["ms"] / 1e9
        out[T] = row
        if small and row["triton"] and max(t for t in tokens if t * L.k <= 2048) == T:
            best = {
                key: row["triton"][0][key] for key in ("BM", "BN", "BK", "num_warps", "num_stages")
            }
            moe_grouped.FUSED_CONFIGS[0] = (2048, best)  # what the engine part runs with
            out["decode_config"] = best
        print(json.dumps({"T": T, **{k: v for k, v in row.items() if k != "triton"},
                          "triton_best": row["triton"][:2]}), flush=True)  # fmt: skip
    moe_ops.GROUPED_IMPL = "auto"
    torch.cuda.empty_cache()


def engine_part(
    res: dict, batches: list[int], compare_batches: list[int], kernel_batches: list[int]
) -> None:
    """The whole 48B geometry through the engine (benchmarks/engine.py's functions) with the
    kernels as configured now: decode steps (graphs, async) and one step's kernel table."""
    from benchmarks import engine as eb
    from prfaas.model.checkpoint import build_model

    dev = torch.device("cuda")
    model = build_model("kimi-linear-48b", dev, torch.bfloat16)
    ceil = eb.measure_ceilings(dev)
    out: dict = {"ceilings": ceil, "rows": [], "kernels": {}}
    res["engine"] = out
    cfg_kw = {"model": "kimi-linear-48b", "device": "cuda"}
    runs = [(B, "auto") for B in batches] + [(B, "grouped_mm") for B in compare_batches]
    for B, impl in runs:
        moe_ops.GROUPED_IMPL = impl
        dt, eng = eb.bench_decode(cfg_kw, B, 1024, 20, model=model, graphs=True, async_decode=True)
        floor = eb.decode_floor(eng.model_config, eng.model, B, 1024, 2, eng.experts_touched)
        gdt = eng.runner.graphs.replay_seconds(*eng.runner.graphs.buckets()[-1], 20)
        floor_s = floor["total"] / ceil["measured_bw"]
        row = {"batch": B, "grouped_impl": impl, "step_ms": dt * 1e3, "replay_ms": gdt * 1e3, "floor_ms": floor_s * 1e3,
               "frac_floor": floor_s / dt, "frac_floor_replay": floor_s / gdt}  # fmt: skip
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del eng
        if impl == "auto" and B in kernel_batches:
            out["kernels"][B] = eb._decode_kernels(model, B, 1024, 40)
            print(json.dumps(out["kernels"][B][:12]), flush=True)
    moe_ops.GROUPED_IMPL = "auto"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", nargs="*", default=["decode", "engine", "grouped"])
    ap.add_argument("--tokens", type=int, nargs="*", default=[128, 1024, 8192, 32768])
    ap.add_argument("--engine-batches", type=int, nargs="*", default=[1])
    ap.add_argument("--compare-batches", type=int, nargs="*", default=[], help="also grouped_mm")
    ap.add_argument("--kernel-batches", type=int, nargs="*", default=[1])
    ap.add_argument("--sweep-small", action="store_true", help="grouped: wide sweep <= 2048 pairs")
    ap.add_argument("--budget-s", type=float, default=240, help="stop sweeps after this")
    args = ap.parse_args()
    t0 = time.time()
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python benchmarks/gpu_tune_moe.py " + " ".join(sys.argv[1:]),
    }
    n_layers = sum(PRESETS["kimi-linear-48b"].is_moe_layer(i) for i in range(27))

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))

    if "decode" in args.parts:
        decode_part(res, n_layers, t0 + args.budget_s * 0.6)
        save()
    if "grouped" in args.parts:
        grouped_part(res, args.tokens, t0 + args.budget_s, args.sweep_small)
        save()
    if "engine" in args.parts:
        engine_part(res, args.engine_batches, args.compare_batches, args.kernel_batches)
        save()
    res["seconds"] = time.time() - t0
    save()
    print(json.dumps({"summary": {k: v for k, v in res.get("decode", {}).items() if "step" in k}}))
    print(json.dumps({"tuned": res.get("decode", {}).get("tuned")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
