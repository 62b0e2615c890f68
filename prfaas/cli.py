"""The ``prfaas`` command: one entry point, one sub-command per job.

Each sub-command lives in the package that owns it and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to the function that runs it.  That module is imported only when its
command runs (or its own ``--help`` is asked for): ``prfaas --help`` lists the commands from the
table below without importing any of them, so it needs no torch.  A test checks the table's help
lines against the ones the modules register.

Ctrl-C (or a SIGTERM a command turns into one) never prints a traceback: a command that does
not handle it itself ends with ``prfaas CMD: interrupted`` on stderr and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import NoReturn

from prfaas import __version__

# command -> (module that registers it, its one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": (
        "prfaas.engine.cli",
        "generate text offline with one engine (default: tiny on CPU)",
    ),
    "plan": (
        "prfaas.scheduling.plan_cli",
        "PrfaaS capacity planner (threshold t and N_p/N_d split)",
    ),
    "sim": ("prfaas.sim.cli", "discrete-event simulation of PrfaaS / PD deployments"),
    "up": (
        "prfaas.server.cli",
        "start a PrfaaS deployment on this machine (PrfaaS + PD clusters, emulated link, gateway)",
    ),
    "serve": (
        "prfaas.server.serve_cli",
        "serve one model on this machine with the OpenAI API (like vllm serve)",
    ),
    "node": ("prfaas.server.cli", "run one node (one engine, one role, one cluster)"),
    "router": ("prfaas.server.cli", "run the gateway/router against already running nodes"),
    "bench": ("prfaas.bench.cli", "load-test an OpenAI-compatible endpoint (ours, vLLM, SGLang)"),
    "profile": (
        "prfaas.engine.profile_cli",
        "measure S_kv, prefill latency and decode step time; write a hardware profile",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one line for a bad argument (``prfaas CMD: error: ...``, exit 2), the way
    every command reports its own argument errors (``prfaas.cli_args.fail``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = _Parser(prog="prfaas", description="Prefill-as-a-Service for hybrid-attention LLMs")
    parser.add_argument("--version", action="version", version=f"prfaas {__version__}")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s module registered (all modules when None); without a
    command to run, ``main`` uses the lazy listing instead."""
    parser, sub = _parser()
    modules = dict.fromkeys(m for c, (m, _) in COMMANDS.items() if command in (None, c))
    for name in modules:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def _listing() -> argparse.ArgumentParser:
    """Every command with its help line, none of their modules imported."""
    parser, sub = _parser()
    for cmd, (_, help_) in COMMANDS.items():
        sub.add_parser(cmd, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:  # help, no command, or an unknown one: argparse answers
        parser = _listing()
        parser.parse_args(argv)
        parser.print_help()
        return 2
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C anywhere (imports included): one line, no traceback
        print(f"prfaas {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
