"""``prfaas bench``: replay a Mooncake trace or a synthetic workload against an OpenAI-compatible
endpoint and report latency percentiles, throughput, goodput, errors and prfaas routing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.bench.metrics import BenchReport

# the parser's defaults, as the modules that use them define them (a test keeps them equal); the
# modules load only when the command runs, so --help is instant
ENDPOINT_NAMES = ("completions", "chat")  # prfaas.bench.client.ENDPOINTS
IGNORE_EOS_MODES = ("off", "ignore_eos", "min_tokens", "both")  # prfaas.bench.client
DEFAULT_BLOCK_TOKENS = 512  # prfaas.bench.prompts
SYNTHETIC_OUTPUT_LEN = 1024  # prfaas.bench.workload

DEFAULT_TRACE = "../shared/traces/mooncake_synthetic_trace.jsonl"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint (ours, vLLM, SGLang)",
        description="Open-loop streaming load client: replays a Mooncake trace (arrivals, lengths, "
        "shared prefixes from hash_ids) or a synthetic Poisson / log-normal workload and reports "
        "TTFT / TPOT / ITL / E2E percentiles, throughput, goodput under SLOs, errors by kind and "
        "the server's prfaas routing fields. Prompts are ASCII text: one character = one token "
        "with the byte-level tokenizer.",
    )
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: first of GET /v1/models)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", default=None, help=f"Mooncake JSONL trace, e.g. {DEFAULT_TRACE}")
    src.add_argument(
        "--synthetic", choices=("lognormal",), default=None, help="Poisson / log-normal workload"
    )
    p.add_argument("--rate", type=float, default=None, help="synthetic arrival rate, req/s")
    p.add_argument("--num-requests", type=int, default=100, help="synthetic request count")
    p.add_argument(
        "--output-len",
        type=int,
        default=SYNTHETIC_OUTPUT_LEN,
        help="synthetic output length (tokens)",
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic workload seed")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply arrival times by this (2 = half the rate, 0.5 = twice the rate)",
    )
    p.add_argument("--max-requests", type=int, default=None, help="send only the first N")
    p.add_argument(
        "--skip-requests", type=int, default=0, help="start at request N of the trace (0-based)"
    )
    p.add_argument("--max-input-tokens", type=int, default=None, help="cap prompt lengths")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap max_tokens")
    p.add_argument("--concurrency", type=int, default=None, help="max requests in flight")
    p.add_argument("--max-connections", type=int, default=256, help="HTTP connection pool size")
    p.add_argument("--endpoint", choices=ENDPOINT_NAMES, default="completions")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO, seconds")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO, seconds")
    p.add_argument(
        "--ignore-eos",
        choices=IGNORE_EOS_MODES,
        default="both",
        help="force full-length outputs: send ignore_eos=true and/or min_tokens=max_tokens",
    )
    p.add_argument(
        "--no-usage", action="store_true", help="do not ask for stream_options.include_usage"
    )
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    p.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS)
    p.add_argument(
        "--prompt-seed", type=int, default=0, help="change to get prompts no cache has seen"
    )
    p.add_argument("--request-timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
    p.add_argument(
        "--max-duration", type=float, default=None, help="stop the run after this many seconds"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--save", default=None, help="write report + per-request records (JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def _extra_body(s: str | None) -> dict[str, Any]:
    if s is None:
        return {}
    try:
        v = json.loads(s)
    except ValueError as e:
        raise ValueError(f"--extra-body is not valid JSON: {e}") from e
    if not isinstance(v, dict):
        raise ValueError("--extra-body must be a JSON object")
    return v


def execute(args: argparse.Namespace) -> tuple[BenchReport, list[dict[str, Any]]]:
    """Run the benchmark described by parsed ``args``; the report and per-request records."""
    from prfaas.bench.client import BenchConfig, run
    from prfaas.bench.metrics import summarize
    from prfaas.bench.workload import load_trace, prepare, synthetic_lognormal

    if args.synthetic:
        if args.rate is None:
            raise ValueError("--synthetic needs --rate (req/s)")
        reqs = synthetic_lognormal(
            args.rate, args.num_requests, output_len=args.output_len, seed=args.seed
        )
        source = f"synthetic:{args.synthetic}:rate={args.rate:g}:n={args.num_requests}"
    else:
        if args.rate is not None:
            raise ValueError("--rate applies to --synthetic; use --time-scale with --trace")
        reqs = load_trace(args.trace)  # all, then the first arrivals (a file may be unsorted)
        source = f"trace:{args.trace}"
    reqs = prepare(
        reqs,
        args.time_scale,
        args.max_requests,
        args.max_input_tokens,
        args.max_output_tokens,
        skip_requests=args.skip_requests,
    )
    cfg = BenchConfig(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        max_connections=args.max_connections,
        request_timeout_s=args.request_timeout,
        connect_timeout_s=args.connect_timeout,
        max_duration_s=args.max_duration,
        ignore_eos=args.ignore_eos,
        include_usage=not args.no_usage,
        extra_body=_extra_body(args.extra_body),
        api_key=args.api_key,
        block_tokens=args.block_tokens,
        prompt_seed=args.prompt_seed,
    )
    for name, v in (("--slo-ttft", args.slo_ttft), ("--slo-tpot", args.slo_tpot)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0 s, got {v}")
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(reqs), unit="req", desc="bench", file=sys.stderr)
    try:
        result = run(reqs, cfg, on_done=(lambda _r: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    config = {
        "url": cfg.url,
        "model": result.model,
        "endpoint": cfg.endpoint,
        "source": source,
        "requests": len(reqs),
        "time_scale": args.time_scale,
        "max_requests": args.max_requests,
        "skip_requests": args.skip_requests,
        "max_input_tokens": args.max_input_tokens,
        "max_output_tokens": args.max_output_tokens,
        "concurrency": cfg.concurrency,
        "ignore_eos": cfg.ignore_eos,
        "block_tokens": cfg.block_tokens,
        "prompt_seed": cfg.prompt_seed,
        "request_timeout_s": cfg.request_timeout_s,
        "max_duration_s": cfg.max_duration_s,
    }
    rep = summarize(result.results, result.duration_s, args.slo_ttft, args.slo_tpot, config)
    return rep, [r.to_dict() for r in result.results]


def main(args: argparse.Namespace) -> int:
    from prfaas.bench.client import BenchError
    from prfaas.bench.report import format_text

    try:
        rep, records = execute(args)
    except (ValueError, BenchError) as e:
        print(f"prfaas bench: error: {e}", file=sys.stderr)
        return 2
    if args.save:
        path = Path(args.save)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**rep.to_dict(), "per_request": records}, indent=1) + "\n")
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(format_text(rep))
    return 0 if rep.completed > 0 else 1
