"""``prfaas generate``: run prompts through the offline engine (greedy by default), with progress
bars on a terminal: the model built or loaded, then the requests as they finish."""

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
from prfaas.cli_progress import counter, stages


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text offline with one engine (default: tiny on CPU)"
    )
    p.add_argument("prompts", nargs="*", default=["Hello, prfaas"], help="prompt texts")
    p.add_argument(
        "--model", default="tiny", help="preset (tiny, small, kimi-linear-48b) or model dir"
    )
    p.add_argument("--max-tokens", type=positive_int, default=16)
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


def check_args(args: argparse.Namespace) -> None:
    """The argument errors, before anything loads (one line, exit status 2)."""
    from prfaas.model.config import resolve_config

    prog = "prfaas generate"
    if args.temperature < 0:
        fail(prog, f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        fail(prog, f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < -1:
        fail(prog, f"--top-k must be -1 (off) or positive, got {args.top_k}")
    try:
        resolve_config(args.model)
    except ValueError as e:
        fail(prog, str(e))
    tp = args.tensor_parallel_size
    why = (
        check_cuda(args.device)
        or check_tp_model(args.model, tp)
        or check_tp_devices(args.device, tp)
    )
    if why:
        fail(prog, why)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        engine = load_engine(args.model, args.device, args.tensor_parallel_size)
        from prfaas.engine import SamplingParams

        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        try:
            outs = generate(engine, args.prompts, params)
        finally:
            engine.close()  # a tensor-parallel engine's ranks
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
    print(f"# {len(outs)} requests, {n} tokens in {dt:.2f} s on {engine.device}")
    return 0


def load_engine(model: str, device: str, tensor_parallel_size: int = 1):  # noqa: ANN201
    """The engine (an LLMEngine) of ``model`` on ``device``, under a progress bar from the start
    (torch's import included: the first thing the command shows comes at once); with
    ``tensor_parallel_size`` > 1 the engine starts its ranks and builds their models itself."""
    names = ["loading torch", f"building {model}", "allocating the KV cache"]
    with stages("prfaas generate", names) as st:
        from prfaas.engine import EngineConfig, LLMEngine
        from prfaas.model.checkpoint import build_model

        cfg = EngineConfig(model=model, device=device, tensor_parallel_size=tensor_parallel_size)
        dev, dt = cfg.resolved_device(), cfg.resolved_dtype()
        st.next(f"building {model} on {dev}")
        if tensor_parallel_size > 1:
            engine = LLMEngine(cfg)
            st.next()
        else:
            m = build_model(model, dev, dt, cfg.seed)
            st.next()
            engine = LLMEngine(cfg, model=m)
        st.next()
    return engine


def generate(engine, prompts: list[str], params) -> list:  # noqa: ANN001
    """Every prompt run to its end (outputs in the prompts' order), a bar over the requests
    finished and the tokens generated."""
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    tokens: dict[str, int] = {}
    with counter("prfaas generate", len(ids), "req") as bar:
        while engine.has_unfinished():
            outs = engine.step()
            for out in outs:
                tokens[out.request_id] = len(out.token_ids)
                if out.finished:
                    done[out.request_id] = out
                    bar.update()
            if outs:
                bar.set_postfix_str(f"{sum(tokens.values())} tokens")
    return [done[i] for i in ids]
