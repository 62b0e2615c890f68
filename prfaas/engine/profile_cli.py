"""``prfaas profile``: measure the model on this device and write a HardwareProfile file that the
planner and simulator load (``prfaas.scheduling.profile.load_profiles``): KV size and prefill time
per length, decode step time per batch, and the nodes' hand-off costs (export out of a prefill
engine, import into a decode engine, at the shortest and the longest length).  On a terminal,
progress bars show the model being built or loaded, then the measurements (one line each)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from prfaas.cli_args import check_cuda, device, fail
from prfaas.cli_progress import counter, stages


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure S_kv, prefill latency and decode step time; write a hardware profile",
        description=__doc__,
    )
    p.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[1024, 8192, 32768, 131072],
        help="prefill lengths (those that do not fit are skipped)",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64, 128],
        help="decode batch sizes",
    )
    p.add_argument("--ctx", type=int, default=1024, help="decode context length")
    p.add_argument("--steps", type=int, default=10, help="decode steps timed per batch size")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: whole)")
    p.add_argument(
        "--checkpoint-interval",
        type=int,
        default=0,
        help="prefill as a node with prefix caching does: KDA state checkpoints every N tokens "
        "(the deployment's engine.checkpoint_interval); 0 (default): no prefix cache",
    )
    p.add_argument("--name", default=None, help="profile name (default: model-device)")
    p.add_argument("--gpus-per-instance", type=int, default=1)
    p.add_argument("--out", default=None, help="profile file (.yaml or .json); default: print")
    p.set_defaults(func=main)


def check_args(args: argparse.Namespace) -> None:
    """The argument errors, before anything loads (one line, exit status 2)."""
    prog = "prfaas profile"
    lengths, batches = sorted(set(args.lengths)), sorted(set(args.batches))
    if len(lengths) < 2 or lengths[0] < 2:
        fail(prog, f"--lengths: need at least 2 distinct lengths >= 2, got {args.lengths}")
    if batches[0] < 1:
        fail(prog, f"--batches must be >= 1, got {args.batches}")
    if args.ctx < 2 or args.steps < 1:
        fail(prog, f"--ctx must be >= 2 and --steps >= 1 (got {args.ctx}, {args.steps})")
    if args.gpus_per_instance < 1:
        fail(prog, "--gpus-per-instance must be >= 1")
    if args.checkpoint_interval < 0:
        fail(prog, "--checkpoint-interval must be >= 0")
    from prfaas.model.config import resolve_config

    try:
        resolve_config(args.model)
    except ValueError as e:
        fail(prog, str(e))
    why = check_cuda(args.device)
    if why:
        fail(prog, why)


def main(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        names = ["loading torch", f"building {args.model}"]
        with stages("prfaas profile", names) as st:
            from prfaas.engine import EngineConfig
            from prfaas.engine.profiling import run_profile
            from prfaas.model.checkpoint import build_model
            from prfaas.scheduling.profile import gbps

            cfg = EngineConfig(model=args.model, device=args.device)
            dev, dt = cfg.resolved_device(), cfg.resolved_dtype()
            st.next(f"building {args.model} on {dev}")
            model = build_model(args.model, dev, dt, cfg.seed)
            st.next()
        n = len(set(args.lengths)) + len(set(args.batches)) + 2  # + the two hand-offs
        with counter("prfaas profile", n, "step") as bar:

            def log(line: str) -> None:  # one line per measurement
                bar.write(line, file=sys.stderr)
                bar.update()

            res = run_profile(
                model,
                args.lengths,
                args.batches,
                args.ctx,
                args.steps,
                args.device,
                args.name,
                args.chunk,
                log=log,
                checkpoint_interval=args.checkpoint_interval,
            )
    except ValueError as e:
        fail("prfaas profile", str(e))
    prof = res.profile(args.gpus_per_instance)
    data = {
        "profiles": {prof.name: prof.to_dict()},
        "meta": {
            "model": res.model,
            "device": res.device,
            "torch": _torch_version(),
            "decode_ctx": res.decode_ctx,
            "skipped_lengths": {str(k): v for k, v in res.skipped.items()},
            "handoff": [dataclasses.asdict(h) for h in res.handoff],
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    rows = [f"{'length':>8} {'S_kv MiB':>10} {'prefill s':>10} {'Phi_kv Gbps':>12}"]
    for n, kv, t in zip(res.lengths, res.kv_bytes, res.prefill_s, strict=True):
        rows.append(f"{n:>8} {kv / 2**20:>10.2f} {t:>10.4f} {gbps(kv / t):>12.2f}")
    rows.append(f"{'batch':>8} {'step s':>10}  (decode, ctx {res.decode_ctx})")
    for b, t in zip(res.decode_batch, res.decode_step_s, strict=True):
        rows.append(f"{b:>8} {t:>10.5f}")
    for h in res.handoff:
        rows.append(
            f"hand-off {h.length:>6}: {h.nbytes} B, export {h.export_s * 1e3:.2f} ms, import "
            f"{h.import_s * 1e3:.2f} ms, first step {h.first_step_s * 1e3:.2f} ms"
        )
    print("\n".join(rows), file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".json":
            out.write_text(json.dumps(data, indent=2) + "\n")
        else:
            import yaml

            out.write_text(yaml.safe_dump(data, sort_keys=False))
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(json.dumps(data, indent=2))
    return 0


def _torch_version() -> str:
    import torch

    return str(torch.__version__)
