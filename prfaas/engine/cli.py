"""``prfaas generate``: run prompts through the offline engine (greedy by default), with progress
bars on a terminal: the model built or loaded, then the requests as they finish."""

from __future__ import annotations

import argparse
import json
import sys
import time

from prfaas.cli_args import check_cuda, device, fail
from prfaas.cli_progress import counter, stages


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
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    why = check_cuda(args.device)
    if why:
        fail("prfaas generate", why)
    from prfaas.engine import SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        engine = load_engine(args.model, args.device)
        t0 = time.perf_counter()
        outs = generate(engine, args.prompts, params)
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


def load_engine(model: str, device: str):  # noqa: ANN201 - an LLMEngine
    """The engine of ``model`` on ``device``, its model built or loaded under a progress bar."""
    from prfaas.engine import EngineConfig, LLMEngine
    from prfaas.model.checkpoint import build_model

    cfg = EngineConfig(model=model, device=device)
    dev, dt = cfg.resolved_device(), cfg.resolved_dtype()
    names = [f"building {model} on {dev}", "allocating the KV cache"]
    with stages("prfaas generate", names) as st:
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
