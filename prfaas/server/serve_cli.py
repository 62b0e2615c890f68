"""``prfaas serve MODEL``: one model on one machine behind the OpenAI API, shaped like
``vllm serve`` (positional model, ``--host``, ``--port``, ``--api-key``, ``--max-model-len``,
``--served-model-name``, ``--gpu-memory-utilization``, ``--tensor-parallel-size``: that many
ranks, one process and GPU each, docs/tensor_parallel.md).
``prfaas up`` stays the two-cluster deployment.

Every argument is checked before anything loads (a bad one: one line on stderr, exit 2): the
model is a preset or a model directory, the port can be listened on, the device exists.  Then the
socket is bound, the model built or loaded, the engine's KV cache sized (on CUDA:
``--gpu-memory-utilization`` of the GPU's memory, less what is in use after the weights), and the
API served until Ctrl-C or SIGTERM (no traceback; requests still running end at once, as
``prfaas.server.gateway.serve.GatewayServer`` stops them, and are aborted in the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import NoReturn

from prfaas.cli_args import (
    check_bindable,
    check_cuda,
    check_tp_devices,
    check_tp_model,
    device,
    fail,
    fraction,
    port,
    positive_int,
)
from prfaas.cli_progress import stages

log = logging.getLogger("prfaas.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve one model on this machine with the OpenAI API (like vllm serve)",
        description="One engine, one model, the OpenAI API (completions, chat, tokenize, "
        "metrics). Presets (tiny, small, ...) have random weights: their text is gibberish; "
        "give a checkpoint directory for a real model.",
    )
    p.add_argument("model", help="model preset (tiny, small, kimi-linear-48b) or model directory")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="listen port (0 = any free port)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 and /admin (default: $PRFAAS_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="model name in the API")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="context length")
    p.add_argument(
        "--gpu-memory-utilization",
        type=fraction,
        default=0.9,
        help="share of the GPU's memory for weights and KV cache (CUDA only; default 0.9)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive_int,
        default=1,
        help="ranks (one process and GPU each: cuda:N..cuda:N+size-1) of the engine",
    )
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--max-num-seqs", type=positive_int, default=32, help="requests per batch")
    p.add_argument("--seed", type=int, default=0, help="random weights (presets), default seed")
    p.add_argument(
        "--max-inflight", type=positive_int, default=256, help="admitted requests (then 429)"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--ready-file", default=None, help="write the URL here (JSON) once serving")
    p.set_defaults(func=run_serve_cmd)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading anything (SystemExit 2 with one line)."""
    from prfaas.model.config import resolve_config

    prog = "prfaas serve"
    try:
        mcfg = resolve_config(args.model)
    except ValueError as e:
        fail(prog, str(e))
    why = check_tp_model(args.model, args.tensor_parallel_size)
    if why:
        fail(prog, why)
    if args.max_model_len is not None and args.max_model_len < 2:
        fail(prog, "--max-model-len must be at least 2")
    if args.max_model_len is not None and args.max_model_len > mcfg.max_position_embeddings:
        fail(
            prog,
            f"--max-model-len {args.max_model_len} exceeds the model's "
            f"{mcfg.max_position_embeddings} positions",
        )
    why = check_bindable(args.host, args.port)
    if why:
        fail(prog, why)
    why = check_cuda(args.device) or check_tp_devices(args.device, args.tensor_parallel_size)
    if why:
        fail(prog, why)


def kv_budget_blocks(
    total: int, free: int, utilization: float, model_config, engine_kw: dict
) -> dict[str, int]:
    """The engine's ``num_blocks`` / ``num_checkpoints`` for a GPU of ``total`` bytes with
    ``free`` bytes free after the weights: ``utilization * total`` less what is in use."""
    from prfaas.cache.hybrid import CacheConfig

    budget = int(utilization * total) - (total - free)
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization}: the weights already use "
            f"{(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB"
        )
    cc = CacheConfig.from_budget(
        model_config,
        budget,
        block_size=engine_kw.get("block_size", 16),
        max_seqs=engine_kw.get("max_num_seqs", 32),
        checkpoint_interval=engine_kw.get("checkpoint_interval", 64),
    )
    return {"num_blocks": cc.num_blocks, "num_checkpoints": cc.num_checkpoints}


def build_engine(args: argparse.Namespace):  # noqa: ANN201
    """The engine of ``args`` (model built or loaded, cache sized), under a progress bar from
    the start (torch's import included)."""
    kw = {"max_num_seqs": args.max_num_seqs}
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    names = ["loading torch", f"building {args.model}", "allocating the KV cache"]
    with stages("prfaas serve", names) as st:
        from prfaas.engine import EngineConfig, LLMEngine
        from prfaas.model.checkpoint import build_model

        base = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, **kw
        )
        dev, dt = base.resolved_device(), base.resolved_dtype()
        st.next(f"building {args.model} on {dev}")
        if args.tensor_parallel_size > 1:  # the engine starts its ranks and sizes their caches
            cfg = EngineConfig(
                model=args.model,
                device=args.device,
                dtype=args.dtype,
                seed=args.seed,
                gpu_memory_utilization=args.gpu_memory_utilization,
                tensor_parallel_size=args.tensor_parallel_size,
                **kw,
            )
            engine = LLMEngine(cfg)
            st.next()
            st.next()
            return engine
        model = build_model(args.model, dev, dt, args.seed)
        st.next()
        if dev.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(dev)
            kw.update(kv_budget_blocks(total, free, args.gpu_memory_utilization, model.config, kw))
        cfg = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, **kw
        )
        engine = LLMEngine(cfg, model=model)
        st.next()
    return engine


def run_serve_cmd(args: argparse.Namespace) -> NoReturn:
    check_args(args)
    # --log-level is prfaas's; the libraries' INFO lines (torch's at exit) stay out
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("prfaas").setLevel(args.log_level.upper())
    from prfaas.server.sockets import bind_socket, exit_now, install_sigterm_as_interrupt

    install_sigterm_as_interrupt()
    engine = None
    try:
        sock = bind_socket(args.host, args.port)
        try:
            engine = build_engine(args)
        except ValueError as e:
            fail("prfaas serve", str(e))
        server = _server(args, engine, sock)
        # uvicorn's serve() is the main coroutine: it handles Ctrl-C from its first step, so an
        # interrupt during start-up stops it cleanly as well
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        if engine is not None:
            engine.close()  # a tensor-parallel engine's ranks
    print("prfaas serve: stopped", file=sys.stderr)
    exit_now(0)


def _server(args: argparse.Namespace, engine, sock):  # noqa: ANN001, ANN202
    """The API server of ``engine`` on ``sock`` (not started): it prints the URL and writes
    the ready file once it serves."""
    from prfaas.server.auth import resolve_api_key
    from prfaas.server.gateway.api import build_gateway_app
    from prfaas.server.gateway.serve import gateway_server
    from prfaas.server.local import LocalBackend
    from prfaas.server.sockets import write_ready_file

    name = args.served_model_name or args.model
    backend = LocalBackend(engine, name, args.max_inflight)
    app = build_gateway_app(backend, name, api_key=resolve_api_key(args.api_key))
    host, port_ = sock.getsockname()[:2]
    url = f"http://{host}:{port_}"

    def announce() -> None:
        print(f"prfaas serve: {name} ready at {url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        if args.ready_file:
            write_ready_file(args.ready_file, json.dumps({"url": url, "pid": os.getpid()}))

    return gateway_server(app, on_started=announce)
