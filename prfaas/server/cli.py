"""``prfaas up`` (a whole deployment on one machine), ``prfaas node`` and ``prfaas router`` (the
same components one by one, e.g. on separate machines)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from prfaas.cli_args import (
    check_bindable,
    check_cuda,
    check_tp_devices,
    device,
    fail,
    port,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser(
        "up",
        help="start a PrfaaS deployment on this machine (PrfaaS + PD clusters, emulated link, gateway)",
        description="Starts every node of the deployment config as its own process on loopback "
        "(default: 1 PrfaaS prefill node, 1 PD-P, 1 PD-D, tiny model on CPU), an emulated "
        "cross-cluster link and the OpenAI-compatible gateway; Ctrl-C stops everything.",
    )
    _common(up)
    up.add_argument("--host", default=None, help="gateway host (default: config router.host)")
    up.add_argument("--port", type=port, default=None, help="gateway port (0 = any free port)")
    _scheduler(up)
    up.add_argument("--policy", default=None, help="prfaas | homogeneous | naive")
    up.add_argument("--model", default=None, help="model preset or directory (default: config)")
    up.add_argument(
        "--device", type=device, default=None, help="auto | cpu | cuda | cuda:N (default: config)"
    )
    up.add_argument(
        "--link-gbps", type=float, default=None, help="bandwidth of every emulated link"
    )
    up.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive_int,
        default=None,
        help="ranks (GPUs) of every node without its own tensor_parallel_size (default: config)",
    )
    up.add_argument("--smoke", action="store_true", help="send a few requests, print them, exit")
    up.add_argument(
        "--prefix-pool",
        action="store_true",
        help="per-cluster Mooncake Store prefix pool + global KV manager (one mooncake_master each)",
    )
    up.add_argument("--cache-mode", default=None, help="oblivious | scarce | abundant | auto")
    up.add_argument("--log-dir", default=None, help="where node logs go (default: a temp dir)")
    up.add_argument("--ready-file", default=None, help="write the gateway URL here once serving")
    _api_key_arg(up)
    up.set_defaults(func=run_up_cmd)

    node = sub.add_parser("node", help="run one node (one engine, one role, one cluster)")
    _common(node)
    node.add_argument("--node", required=True, help="node name in the deployment config")
    node.add_argument("--ready-file", default=None, help="write the bound ports here (JSON)")
    node.add_argument("--parent-pid", type=int, default=None, help="exit when this parent is gone")
    node.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive_int,
        default=None,
        help="this node's ranks, one process and GPU each (default: config)",
    )
    node.set_defaults(func=run_node_cmd)

    router = sub.add_parser("router", help="run the gateway/router against already running nodes")
    _common(router)
    router.add_argument("--host", default=None)
    router.add_argument("--port", type=port, default=None)
    router.add_argument("--ready-file", default=None)
    _scheduler(router)
    _api_key_arg(router)
    router.set_defaults(func=run_router_cmd)


def _scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fixed-threshold",
        "--threshold",
        dest="threshold",
        type=float,
        default=None,
        metavar="T",
        help="route on a fixed t (tokens), no short-term re-search (default: the whole scheduler: "
        "the planner's t over the deployment's profile, re-searched on observed lengths)",
    )
    p.add_argument(
        "--no-rebalance", action="store_true", help="no live PD role rebalancing (role switches)"
    )
    p.add_argument("--profile", default=None, help="hardware profile file the scheduler plans with")


def _apply_scheduler(cfg, args: argparse.Namespace) -> None:  # noqa: ANN001
    if args.threshold is not None:
        cfg.router.threshold = args.threshold
    if args.no_rebalance:
        cfg.router.rebalance = False
    if args.profile is not None:
        from pathlib import Path

        cfg.router.profile = str(Path(args.profile).resolve())


def _api_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=None,
        help="clients must send 'Authorization: Bearer KEY' on /v1 and /admin routes "
        "(default: $PRFAAS_API_KEY; none: open)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="deployment YAML (default: prfaas/configs/deploy_local.yaml)"
    )
    p.add_argument("--log-level", default="warning", help="debug | info | warning | error")


def _load(args: argparse.Namespace, full: bool = True):  # noqa: ANN202
    from prfaas.server.config import load_deploy_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    return load_deploy_config(args.config, full)


def run_up_cmd(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args, full=False)  # torch-free checks first: a bad port fails in ~0.2 s
        _apply_scheduler(cfg, args)
        if args.policy is not None:
            cfg.router.policy = args.policy
        if args.model is not None:
            cfg.model = args.model
        if args.device is not None:
            cfg.device = args.device
        if args.prefix_pool:
            cfg.prefix_pool = True
        if args.cache_mode is not None:
            cfg.router.cache_mode = args.cache_mode
        if args.link_gbps is not None:
            for lk in cfg.links:
                lk.gbps, lk.schedule = args.link_gbps, []
        if args.tensor_parallel_size is not None:
            cfg.engine["tensor_parallel_size"] = args.tensor_parallel_size
        cfg.validate(full=False)
    except ValueError as e:
        fail("prfaas up", str(e))
    host = args.host or cfg.router.host
    port_ = cfg.router.port if args.port is None else args.port
    why = check_bindable(host, port_)
    if why:
        fail("prfaas up", why)
    from prfaas.cli_progress import stages

    try:
        # everything, the engine settings too (they load torch: ~1 s, a bar meanwhile)
        with stages("prfaas up", ["checking the deployment"]):
            cfg.validate()
            from prfaas.model.config import resolve_config

            resolve_config(cfg.model)  # a preset or a model directory
    except ValueError as e:
        fail("prfaas up", str(e))
    # before any node starts: the devices
    why = check_cuda(cfg.device)
    for c in cfg.clusters:
        for n in c.nodes:
            why = why or (check_cuda(n.device) if n.device else None)
            why = why or _tp_devices(n.name, n.device or cfg.device, cfg.node_tp(n))
    if why:
        fail("prfaas up", why)
    from prfaas.server.auth import resolve_api_key
    from prfaas.server.launcher import run_up

    try:
        return run_up(
            cfg,
            host,
            port_,
            args.smoke,
            args.ready_file,
            args.log_dir,
            args.log_level,
            resolve_api_key(args.api_key),
        )
    except KeyboardInterrupt:  # during start-up: the nodes already started are stopped
        print("prfaas up: interrupted", file=sys.stderr)
        return 130


def run_node_cmd(args: argparse.Namespace) -> int:
    from prfaas.server.node.process import run_node

    try:
        cfg = _load(args)
        from prfaas.server.auth import check_node_secret

        _, node = cfg.node(args.node)
        check_node_secret(node.host, cfg.secret)
        if args.tensor_parallel_size is not None:
            node.tensor_parallel_size = args.tensor_parallel_size
            cfg.validate()
    except ValueError as e:
        fail(f"prfaas {args.command}", str(e))
    why = _tp_devices(node.name, node.device or cfg.device, cfg.node_tp(node))
    if why:
        fail(f"prfaas {args.command}", why)
    return run_node(cfg, args.node, args.ready_file, args.parent_pid, args.log_level)


def _tp_devices(name: str, dev: str, tp: int) -> str | None:
    why = check_tp_devices(dev, tp)
    return f"node {name!r}: {why}" if why else None


def run_router_cmd(args: argparse.Namespace) -> int:
    # the gateway alone: no engine here, so no torch (the nodes check the engine settings)
    from prfaas.server.auth import resolve_api_key
    from prfaas.server.gateway.serve import serve_gateway
    from prfaas.server.launcher import endpoints_from_config
    from prfaas.server.sockets import install_sigterm_as_interrupt

    try:
        cfg = _load(args, full=False)
        _apply_scheduler(cfg, args)
        cfg.validate(full=False)
        eps = endpoints_from_config(cfg)
    except ValueError as e:
        fail(f"prfaas {args.command}", str(e))

    host = args.host or cfg.router.host
    port = cfg.router.port if args.port is None else args.port
    install_sigterm_as_interrupt()
    try:
        return asyncio.run(
            serve_gateway(
                cfg,
                eps,
                host,
                port,
                ready_file=args.ready_file,
                api_key=resolve_api_key(args.api_key),
            )
        )
    except KeyboardInterrupt:
        return 0
