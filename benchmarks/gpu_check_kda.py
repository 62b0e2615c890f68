"""Check the KDA dispatchers (fla Triton kernels) against the torch path, and time both.

GPU (default): bf16 inputs at Kimi-Linear shapes; ``kda_prefill`` / ``kda_decode`` (fla when
importable) vs ``kda_chunk`` / ``kda_recurrent`` run on the GPU in fp32 on the same values.
``--cpu``: small shapes, dispatchers (torch path on CPU) vs the independent torch algorithm.
Prints one JSON document (also written to ``--out`` if given); exit code 1 if any error is over
tolerance, 2 if the GPU run finds no CUDA or no fla (unless ``--allow-no-fla``).

    python benchmarks/gpu_check_kda.py --out benchmarks/results/kda_gpu_check.json
    python benchmarks/gpu_check_kda.py --cpu
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from prfaas.model.kda_ops import (
    fla_available,
    kda_chunk,
    kda_decode,
    kda_prefill,
    kda_recurrent,
)

# bf16 outputs carry ~2^-8 relative rounding; the state is fp32 in both paths.
REL_TOL_OUT = 2e-2
REL_TOL_STATE = 1e-2


def make_inputs(
    B: int, T: int, H: int, K: int, V: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Kimi-Linear-like inputs: L2-normalised q/k, gate g = -exp(A_log)*softplus(x + dt_bias)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    q = F.normalize(rn(B, T, H, K), dim=-1)
    k = F.normalize(rn(B, T, H, K), dim=-1)
    v = rn(B, T, H, V)
    A = torch.empty(H).uniform_(1.0, 16.0, generator=gen).to(device)
    dt = torch.exp(torch.empty(H, K).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)).to(
        device
    )
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    g = -A.view(1, 1, H, 1) * F.softplus(0.5 * rn(B, T, H, K) + dt_bias)
    beta = torch.sigmoid(rn(B, T, H))
    return {n: x.to(dtype) for n, x in dict(q=q, k=k, v=v, g=g, beta=beta).items()}


def to_fp32(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.float() for n, t in x.items()}


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().item()
    return {
        "max_abs_err": d.max().item(),
        "mean_abs_err": d.mean().item(),
        "rel_err": d.max().item() / scale if scale > 0 else float(d.max().item()),
        "finite": bool(torch.isfinite(out.float()).all().item()),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time in ms over ``reps`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def check_prefill(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    cpu: bool,
) -> dict[str, Any]:
    x = make_inputs(B, T, H, K, V, device, dtype, seed=T + H)
    s0 = 0.1 * torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(7)).to(device)
    s0_keep = s0.clone()
    scale = K**-0.5
    xf = to_fp32(x)
    # reference: on GPU the torch chunked path in fp32; on CPU the independent recurrent path
    ref_fn = kda_recurrent if cpu else kda_chunk
    o_ref, s_ref = ref_fn(**xf, scale=scale, initial_state=s0)
    o, s = kda_prefill(**x, scale=scale, initial_state=s0)
    res: dict[str, Any] = {
        "B": B,
        "T": T,
        "H": H,
        "K": K,
        "V": V,
        "input_dtype": str(dtype).replace("torch.", ""),
        "reference": ref_fn.__name__,
        "out_dtype": str(o.dtype).replace("torch.", ""),
        "o": errors(o, o_ref),
        "state": errors(s, s_ref),
        "initial_state_unchanged": bool(torch.equal(s0, s0_keep)),
    }
    del o_ref, s_ref
    res["ms_dispatch"] = time_ms(
        lambda: kda_prefill(**x, scale=scale, initial_state=s0), device, reps
    )
    res["ms_torch_chunk_fp32"] = time_ms(
        lambda: kda_chunk(**xf, scale=scale, initial_state=s0), device, max(1, reps // 3)
    )
    res["ok"] = (
        res["o"]["finite"]
        and res["state"]["finite"]
        and res["initial_state_unchanged"]
        and res["o"]["rel_err"] < REL_TOL_OUT
        and res["state"]["rel_err"] < REL_TOL_STATE
    )
    return res


def check_decode(
    B: int,
    H: int,
    K: int,
    V: int,
    prefix: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
) -> dict[str, Any]:
    """Prefill a prefix (torch fp32), then ``steps`` decode steps carrying each path's own state."""
    scale = K**-0.5
    x = make_inputs(B, prefix + steps, H, K, V, device, dtype, seed=B + H + steps)
    xf = to_fp32(x)
    pre = {n: t[:, :prefix] for n, t in xf.items()}
    _, s_prefix = kda_chunk(**pre, scale=scale)
    s_disp = s_prefix.clone()
    s_ref = s_prefix.clone()
    worst_o: dict[str, float] = {"max_abs_err": 0.0, "rel_err": 0.0}
    finite = True
    unchanged = True
    for t in range(prefix, prefix + steps):
        xt = {n: v[:, t : t + 1] for n, v in x.items()}
        xtf = {n: v[:, t : t + 1] for n, v in xf.items()}
        keep = s_disp.clone()
        o_d, s_new = kda_decode(**xt, scale=scale, initial_state=s_disp)
        unchanged &= bool(torch.equal(s_disp, keep))
        o_r, s_ref = kda_recurrent(**xtf, scale=scale, initial_state=s_ref)
        s_disp = s_new
        e = errors(o_d, o_r)
        finite &= e["finite"]
        worst_o["max_abs_err"] = max(worst_o["max_abs_err"], e["max_abs_err"])
        worst_o["rel_err"] = max(worst_o["rel_err"], e["rel_err"])
    res: dict[str, Any] = {
        "B": B,
        "H": H,
        "K": K,
        "V": V,
        "prefix": prefix,
        "steps": steps,
        "input_dtype": str(dtype).replace("torch.", ""),
        "o_worst_step": worst_o,
        "final_state": errors(s_disp, s_ref),
        "o_finite": finite,
        "initial_state_unchanged": unchanged,
    }
    x1 = {n: v[:, prefix : prefix + 1] for n, v in x.items()}
    x1f = {n: v[:, prefix : prefix + 1] for n, v in xf.items()}
    res["ms_dispatch_step"] = time_ms(
        lambda: kda_decode(**x1, scale=scale, initial_state=s_prefix), device, reps
    )
    res["ms_torch_recurrent_step_fp32"] = time_ms(
        lambda: kda_recurrent(**x1f, scale=scale, initial_state=s_prefix), device, reps
    )
    res["ok"] = (
        finite
        and unchanged
        and res["final_state"]["finite"]
        and worst_o["rel_err"] < REL_TOL_OUT
        and res["final_state"]["rel_err"] < REL_TOL_STATE
    )
    return res


def torch_self_check(device: torch.device) -> dict[str, Any]:
    """The torch chunked path against the torch recurrent path, fp32, on ``device``."""
    B, T, H, K, V = 1, 1024, 4, 128, 128
    x = to_fp32(make_inputs(B, T, H, K, V, device, torch.float32, seed=3))
    s0 = 0.1 * torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(5)).to(device)
    o_c, s_c = kda_chunk(**x, scale=K**-0.5, initial_state=s0)
    o_r, s_r = kda_recurrent(**x, scale=K**-0.5, initial_state=s0)
    res = {"B": B, "T": T, "H": H, "K": K, "V": V, "o": errors(o_c, o_r), "state": errors(s_c, s_r)}
    res["ok"] = res["o"]["max_abs_err"] < 1e-4 and res["state"]["max_abs_err"] < 1e-4
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="small shapes on CPU (torch vs torch)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--allow-no-fla", action="store_true", help="run the GPU shapes without fla")
    args = ap.parse_args(argv)

    if args.cpu:
        device = torch.device("cpu")
        prefill_shapes = [(1, 512, 4, 64, 64), (1, 1000, 2, 128, 128), (2, 300, 4, 32, 32)]
        decode_shapes = [(1, 4, 64, 64, 100), (8, 2, 128, 128, 64)]
        steps = min(args.decode_steps, 16)
        reps = max(1, min(args.reps, 3))
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --cpu", file=sys.stderr)
            return 2
        if not fla_available() and not args.allow_no_fla:
            print(
                "fla (flash-linear-attention) KDA kernels unavailable; --allow-no-fla to run the "
                "torch path only",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
        prefill_shapes = [(1, T, H, 128, 128) for T in (4096, 32768) for H in (16, 32)]
        decode_shapes = [(1, 32, 128, 128, 4096), (256, 32, 128, 128, 256)]
        steps = args.decode_steps
        reps = args.reps
    dtype = torch.bfloat16

    fla_version = None
    try:
        import fla  # type: ignore[import-not-found]

        fla_version = getattr(fla, "__version__", "unknown")
    except Exception:
        pass
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check_kda.py" + (" --cpu" if args.cpu else ""),
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fla": fla_version,
        "fla_used": device.type == "cuda" and fla_available(),
        "tolerances": {"rel_out": REL_TOL_OUT, "rel_state": REL_TOL_STATE},
        "prefill": [],
        "decode": [],
    }
    with torch.inference_mode():
        for B, T, H, K, V in prefill_shapes:
            report["prefill"].append(check_prefill(B, T, H, K, V, device, dtype, reps, args.cpu))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for B, H, K, V, prefix in decode_shapes:
            report["decode"].append(check_decode(B, H, K, V, prefix, steps, device, dtype, reps))
        if device.type == "cuda":
            report["torch_self_check"] = torch_self_check(device)
    checks = report["prefill"] + report["decode"]
    if "torch_self_check" in report:
        checks.append(report["torch_self_check"])
    report["ok"] = all(r["ok"] for r in checks)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
