"""``prfaas generate``: run prompts through the offline engine."""

from __future__ import annotations

import argparse
import json
import sys
import time

from prfaas.cli_args import (
    check_cuda,
    check_tp_devices,
    check_tp_model,
    device,
    fail,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text offline with one engine (default: tiny on CPU)"
    )
    p.add_argument("prompts", nargs="*", default=["Hello, prfaas"], help="prompt texts")
    p.add_argument(
        "--model", default="tiny", help="preset (tiny, small, kimi-linear-48b) or model dir"
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive_int,
        default=1,
        help="ranks of the engine, one process (and GPU) each",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tp = args.tensor_parallel_size
    why = (
        check_cuda(args.device)
        or check_tp_model(args.model, tp)
        or check_tp_devices(args.device, tp)
    )
    if why:
        fail("prfaas generate", why)
    from prfaas.engine import LLM, SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        llm = LLM(args.model, device=args.device, tensor_parallel_size=tp)
        try:
            t0 = time.perf_counter()
            outs = llm.generate(args.prompts, params)
        finally:
            llm.engine.close()
    except ValueError as e:
        fail("prfaas generate", str(e))
    except KeyboardInterrupt:
        print("prfaas generate: interrupted", file=sys.stderr)
        return 130
    dt = time.perf_counter() - t0
    for o in outs:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_tokens": len(o.prompt_token_ids),
                        "token_ids": o.token_ids,
                        "text": o.text,
                        "finish_reason": o.finish_reason,
                    }
                )
            )
        else:
            print(
                f"[{len(o.prompt_token_ids)} prompt tokens -> {len(o.token_ids)} tokens, "
                f"{o.finish_reason}] {o.token_ids}"
            )
    n = sum(len(o.token_ids) for o in outs)
    print(f"# {len(outs)} requests, {n} tokens in {dt:.2f} s on {llm.engine.device}")
    return 0
