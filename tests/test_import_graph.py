"""The import graph as a test: ``prfaas --help`` and the gateway load no torch (checked in a fresh
interpreter); the transfer layer imports neither the engine nor the server; no import circles
between prfaas packages or between modules (computed with ``ast`` over the source tree: every
``import`` / ``from ... import`` of a prfaas module, function-level ones included, those under
``if TYPE_CHECKING:`` left out)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "prfaas"

# a torch-free interpreter's view: which heavy modules a snippet left loaded
_PROBE = """
import json, sys
{body}
heavy = sorted(m for m in ("torch", "triton", "prfaas.engine", "prfaas.server.node") if m in sys.modules)
print("PROBE" + json.dumps(heavy))
"""


def _loaded_after(body: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
    assert r.returncode == 0 and line, r.stdout + r.stderr
    return json.loads(line[-1][len("PROBE") :])


def test_cli_help_loads_no_torch():
    body = """
from prfaas.cli import main
for argv in (["--help"], ["router", "--help"], ["up", "--help"], ["plan", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
"""
    assert _loaded_after(body) == []


def test_gateway_loads_no_torch():
    """Every gateway module, the deployment config and a router with its app, built."""
    body = """
import importlib, pkgutil
import prfaas.server.gateway as g
for m in pkgutil.iter_modules(g.__path__):
    importlib.import_module("prfaas.server.gateway." + m.name)
from prfaas.server.config import load_deploy_config
from prfaas.server.gateway.api import build_gateway_app
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.router import Router
import prfaas.server.launcher, prfaas.server.cli
cfg = load_deploy_config(full=False)
eps = [NodeEndpoint(n.name, c.name, n.role, "http://127.0.0.1:1") for c in cfg.clusters for n in c.nodes]
build_gateway_app(Router(cfg, eps))
"""
    assert _loaded_after(body) == []


def test_cli_listing_matches_the_commands_modules():
    """The lazy listing of ``prfaas --help`` says what each command's module registers."""
    import argparse

    from prfaas.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {cmd: help_ for cmd, (_, help_) in COMMANDS.items()}


# ---- the static graph ---------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The prfaas modules ``path`` imports at run time (not under ``if TYPE_CHECKING:``);
    ``from pkg import mod`` of a submodule counts as an import of the submodule only."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m == "prfaas" or m.startswith("prfaas.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        graph[mod] = {m for m in _imports(path, set(files)) if m in files and m != mod}
    return graph


def _package(mod: str) -> str:
    """``prfaas.engine.engine`` -> ``prfaas.engine``; top-level modules stand for themselves."""
    return ".".join(mod.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_graph() -> dict[str, set[str]]:
    pg: dict[str, set[str]] = defaultdict(set)
    for mod, deps in _graph().items():
        for d in deps:
            a, b = _package(mod), _package(d)
            if a != b and b != "prfaas":
                pg[a].add(b)
    return pg


def test_no_import_cycles_between_packages():
    assert _cycles(_package_graph()) == []


def _module_cycles() -> list[list[str]]:
    graph = _graph()
    for deps in graph.values():
        deps.discard("prfaas")  # the package's own lazy names
    return _cycles(graph)


def test_no_import_cycles_between_modules():
    assert _module_cycles() == []


def test_transfer_imports_neither_engine_nor_server():
    pg = _package_graph()
    assert pg["prfaas.transfer"], "the graph lost the transfer package"
    assert not pg["prfaas.transfer"] & {"prfaas.engine", "prfaas.server"}


def test_gateway_imports_no_node_engine_or_transfer():
    graph = _graph()
    gw = [m for m in graph if m.startswith("prfaas.server.gateway")]
    assert len(gw) > 5
    for m in gw:
        bad = {
            d
            for d in graph[m]
            if d.startswith(("prfaas.server.node", "prfaas.engine", "prfaas.transfer"))
        }
        assert not bad, (m, bad)
