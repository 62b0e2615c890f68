"""The ``prfaas`` command: one entry point, one sub-command per job.

Each sub-command lives in the package that owns it and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# module that registers the sub-command(s); a module not yet present is skipped
_COMMAND_MODULES = [
    "prfaas.engine.cli",  # generate
    "prfaas.scheduling.plan_cli",  # plan
    "prfaas.sim.cli",  # sim
    "prfaas.server.cli",  # up, node, router
    "prfaas.bench.cli",  # bench
    "prfaas.engine.profile_cli",  # profile
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prfaas", description="Prefill-as-a-Service for hybrid-attention LLMs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
