"""Tensor-parallel scaling: prefill latency and decode throughput of one instance at
TP = 1, 2, 4, 8, the scaling efficiency of each against TP=1, and a PrfaaS hand-off between two
tensor-parallel instances (a TP=a prefill instance exports, a TP=b decode instance imports and
decodes). A benchmark, not a test (tests/test_tp_bench.py runs its CPU path at tiny size).

    # a machine with 8 GPUs: the 48B geometry (random weights), TP 1/2/4/8, hand-off 4 -> 4
    python benchmarks/tp_scaling.py --model kimi-linear-48b --device cuda --tp 1,2,4,8 \\
        --prompt-len 8192 --decode-batch 32 --decode-context 4096 --handoff 4:4
    # CPU (gloo), tiny
    python benchmarks/tp_scaling.py --model tiny --device cpu --tp 1,2 --prompt-len 128 \\
        --decode-batch 2 --decode-context 64 --decode-steps 4 --handoff 2:1

Efficiency of TP=n: speedup / n, speedup = time(TP=1) / time(TP=n) (prefill: latency of one
prompt; decode: time of one decode step of the whole batch). A size that does not divide the
model's heads/experts or needs more GPUs than visible is recorded as skipped with the reason.
The hand-off's instances run on disjoint GPUs (prefill cuda:0..a-1, decode cuda:a..a+b-1).
Writes benchmarks/results/tp_scaling_<model>_<device>.json and .md (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from prfaas import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from prfaas.engine.tp_runtime import check_devices  # noqa: E402
from prfaas.model.config import resolve_config  # noqa: E402
from prfaas.model.tp.shard import check_tp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _on(dev: str) -> contextlib.AbstractContextManager:
    """Make ``dev`` the current CUDA device (Triton launches on the current one)."""
    d = torch.device(dev)
    return torch.cuda.device(d) if d.type == "cuda" else contextlib.nullcontext()


def _prompt(n: int, salt: int, vocab: int) -> list[int]:
    return [(salt * 7919 + i * 31) % min(vocab, 250) + 1 for i in range(n)]


def _engine(args: argparse.Namespace, tp: int, device: str, **kw: object) -> LLMEngine:
    base = dict(
        model=args.model,
        device=device,
        tensor_parallel_size=tp,
        max_num_seqs=max(args.decode_batch, 2),
        max_model_len=max(args.prompt_len, args.decode_context, args.handoff_len) + 64,
        max_num_batched_tokens=max(args.prompt_len, args.handoff_len),
        enable_prefix_cache=False,
    )
    if args.num_blocks:
        base["num_blocks"] = args.num_blocks
    base.update(kw)
    return LLMEngine(EngineConfig(**base))


def _finish(eng: LLMEngine) -> list:
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    return outs


def _close(eng: LLMEngine) -> None:
    eng.close()
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_tp(args: argparse.Namespace, tp: int) -> dict:
    """Prefill latency and decode step time of one TP=tp instance."""
    dev = args.device
    eng = _engine(args, tp, dev)
    d = eng.device
    vocab = eng.model_config.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    try:
        eng.add_request(_prompt(min(args.prompt_len, 256), 0, vocab), one)  # warm-up
        _finish(eng)
        pre = []
        for r in range(args.reps):
            eng.add_request(_prompt(args.prompt_len, r + 1, vocab), one)
            _sync(d)
            t0 = time.perf_counter()
            _finish(eng)
            _sync(d)
            pre.append(time.perf_counter() - t0)
        # decode: a batch at ``decode_context`` tokens, then timed decode-only steps
        many = SamplingParams(temperature=0, max_tokens=args.decode_steps + 8, ignore_eos=True)
        for b in range(args.decode_batch):
            eng.add_request(_prompt(args.decode_context, 100 + b, vocab), many)
        while any(r.in_prefill for r in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        for _ in range(2):  # every row decoding
            eng.step()
        _sync(d)
        steps = []
        for _ in range(args.decode_steps):
            t0 = time.perf_counter()
            eng.step()
            _sync(d)
            steps.append(time.perf_counter() - t0)
        _finish(eng)
    finally:
        _close(eng)
    pre_s, step_s = statistics.median(pre), statistics.median(steps)
    return {
        "tp": tp,
        "prefill_s": pre_s,
        "prefill_tok_s": args.prompt_len / pre_s,
        "decode_step_s": step_s,
        "decode_tok_s": args.decode_batch / step_s,
    }


def measure_handoff(args: argparse.Namespace, a: int, b: int) -> dict:
    """A TP=a prefill instance hands a request to a TP=b decode instance (disjoint GPUs)."""
    if args.device.startswith("cuda"):
        pre_dev, dec_dev = "cuda:0", f"cuda:{a}"
    else:
        pre_dev = dec_dev = args.device
    with _on(pre_dev):
        pre = _engine(args, a, pre_dev, role="prefill")
    try:
        with _on(dec_dev):
            dec = _engine(args, b, dec_dev, role="decode")
    except BaseException:
        _close(pre)
        raise
    vocab = pre.model_config.vocab_size
    sp = SamplingParams(temperature=0, max_tokens=args.handoff_tokens, ignore_eos=True)
    prompt = _prompt(args.handoff_len, 7, vocab)
    try:
        with _on(pre_dev):
            rid = pre.add_request(prompt, sp)
            _sync(pre.device)
            t0 = time.perf_counter()
            _finish(pre)
            _sync(pre.device)
            t1 = time.perf_counter()
            exp = pre.export_request(rid)
            _sync(pre.device)
            t2 = time.perf_counter()
        with _on(dec_dev):
            dec.import_request(exp, sp)
            _sync(dec.device)
            t3 = time.perf_counter()
            outs = _finish(dec)
            _sync(dec.device)
            t4 = time.perf_counter()
        pre.release(rid)
    finally:
        _close(pre)
        _close(dec)
    return {
        "prefill_tp": a,
        "decode_tp": b,
        "prompt_len": args.handoff_len,
        "kv_bytes": exp.nbytes(),
        "prefill_s": t1 - t0,
        "export_s": t2 - t1,
        "import_s": t3 - t2,
        "decode_s": t4 - t3,
        "token_ids": outs[-1].token_ids,
    }


def run(args: argparse.Namespace) -> dict:
    cfg = resolve_config(args.model)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    rows, skipped = [], []
    for tp in args.tp:
        why = check_tp(cfg, tp) or check_devices(dev, tp)
        if why:
            skipped.append({"tp": tp, "reason": why})
            continue
        rows.append(measure_tp(args, tp))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["tp"] == 1), None)
    for r in rows:
        if base is not None:
            r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
            r["prefill_efficiency"] = r["prefill_speedup"] / r["tp"]
            r["decode_speedup"] = base["decode_step_s"] / r["decode_step_s"]
            r["decode_efficiency"] = r["decode_speedup"] / r["tp"]
    handoffs = []
    for a, b in args.handoff:
        need = a + b if dev.type == "cuda" else max(a, b)
        why = check_tp(cfg, a) or check_tp(cfg, b) or check_devices(dev, need)
        if why:
            skipped.append({"handoff": f"{a}:{b}", "reason": why})
            continue
        handoffs.append(measure_handoff(args, a, b))
    if dev.type == "cuda":
        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"{cpu_model()} ({os.cpu_count()} cores)"
    return {
        "model": args.model,
        "device": str(dev),
        "machine": machine,
        "command": "python " + " ".join(sys.argv) if args.record_command else None,
        "prompt_len": args.prompt_len,
        "decode_batch": args.decode_batch,
        "decode_context": args.decode_context,
        "tp": rows,
        "handoff": handoffs,
        "skipped": skipped,
    }


def markdown(res: dict) -> str:
    lines = [
        f"# Tensor-parallel scaling: {res['model']} on {res['machine']}",
        "",
        f"Command: `{res['command']}`" if res.get("command") else "",
        "",
        f"Prefill of one {res['prompt_len']}-token prompt; decode steps of a batch of "
        f"{res['decode_batch']} at {res['decode_context']} tokens of context.",
        "",
        "| TP | prefill s | prefill tok/s | efficiency | decode step ms | decode tok/s | efficiency |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["tp"]:
        pe = f"{r['prefill_efficiency']:.2f}" if "prefill_efficiency" in r else "-"
        de = f"{r['decode_efficiency']:.2f}" if "decode_efficiency" in r else "-"
        lines.append(
            f"| {r['tp']} | {r['prefill_s']:.3f} | {r['prefill_tok_s']:.0f} | {pe} | "
            f"{r['decode_step_s'] * 1e3:.1f} | {r['decode_tok_s']:.0f} | {de} |"
        )
    if res["handoff"]:
        lines += [
            "",
            "| hand-off | prompt | KV MB | prefill s | export s | import s | decode s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for h in res["handoff"]:
            lines.append(
                f"| TP{h['prefill_tp']} -> TP{h['decode_tp']} | {h['prompt_len']} | "
                f"{h['kv_bytes'] / 1e6:.1f} | {h['prefill_s']:.3f} | {h['export_s']:.3f} | "
                f"{h['import_s']:.3f} | {h['decode_s']:.3f} |"
            )
    for s in res["skipped"]:
        lines.append(f"\nSkipped {s.get('tp', s.get('handoff'))}: {s['reason']}")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if item:
            a, b = item.split(":")
            out.append((int(a), int(b)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="kimi-linear-48b")
    p.add_argument("--device", default="cuda", help="cuda (cuda:0..) or cpu")
    p.add_argument("--tp", type=_ints, default=[1, 2, 4, 8], help="sizes, e.g. 1,2,4,8")
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--handoff", type=_pairs, default=[], help="prefill:decode sizes, e.g. 4:4,2:1")
    p.add_argument("--handoff-len", type=int, default=8192)
    p.add_argument("--handoff-tokens", type=int, default=8)
    p.add_argument("--num-blocks", type=int, default=None, help="cache blocks (default: planned)")
    p.add_argument("--out", default=None, help="results path without suffix")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--record-command", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = run(args)
    md = markdown(res)
    print(md)
    if not args.no_write:
        dev = "cuda" if res["device"].startswith("cuda") else "cpu"
        out = Path(args.out) if args.out else RESULTS / f"tp_scaling_{args.model}_{dev}"
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    return res


if __name__ == "__main__":
    main()
