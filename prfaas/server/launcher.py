"""``prfaas up``: start a whole deployment on one machine: the prefix pools' masters (``prefix_pool``
on), one ``prfaas node`` OS process per node, then the gateway in this process (``gateway.serve``).
Imports no torch itself (the nodes do, in their own processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prfaas.config_file import dump_yaml
from prfaas.server.config import DeployConfig
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.serve import serve_gateway
from prfaas.server.protocol import NodeReady

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.cache.pool_mooncake import MooncakeMaster


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    log_file: Path
    info: NodeReady | None = None


def write_config(cfg: DeployConfig, path: Path) -> Path:
    path.write_text(dump_yaml(cfg.to_dict()))
    return path


def _tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def start_nodes(cfg: DeployConfig, run_dir: Path, timeout_s: float = 180.0) -> list[NodeProcess]:
    """One ``prfaas node`` OS process per node of the deployment; returns once all serve."""
    cfg_path = write_config(cfg, run_dir / "deploy.yaml")
    procs: list[NodeProcess] = []
    try:
        for c in cfg.clusters:
            for n in c.nodes:
                ready = run_dir / f"{n.name}.ready.json"
                logf = run_dir / f"{n.name}.log"
                cmd = [
                    sys.executable,
                    "-m",
                    "prfaas.cli",
                    "node",
                    "--config",
                    str(cfg_path),
                    "--node",
                    n.name,
                    "--ready-file",
                    str(ready),
                    "--parent-pid",
                    str(os.getpid()),
                ]
                with open(logf, "wb") as out:
                    p = subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                procs.append(NodeProcess(n.name, p, ready, logf))
        deadline = time.monotonic() + timeout_s
        for np_ in procs:
            while not np_.ready_file.exists():
                if np_.proc.poll() is not None:
                    raise RuntimeError(
                        f"node {np_.name} exited with {np_.proc.returncode}:\n{_tail(np_.log_file)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {np_.name} not ready in {timeout_s} s")
                time.sleep(0.05)
            np_.info = NodeReady.model_validate_json(np_.ready_file.read_text())
    except BaseException:
        stop_nodes(procs)
        raise
    return procs


def stop_nodes(procs: list[NodeProcess], timeout_s: float = 10.0) -> None:
    for np_ in procs:
        if np_.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                np_.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for np_ in procs:
        try:
            np_.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            np_.proc.kill()
            np_.proc.wait()


def endpoints_from_procs(procs: list[NodeProcess]) -> list[NodeEndpoint]:
    eps = []
    for np_ in procs:
        i = np_.info
        assert i is not None, f"node {np_.name} is not ready"
        eps.append(NodeEndpoint(i.name, i.cluster, i.role, f"http://{i.host}:{i.http_port}"))
    return eps


def endpoints_from_config(cfg: DeployConfig) -> list[NodeEndpoint]:
    """Fixed addresses of a multi-machine deployment (every node needs a non-zero http_port)."""
    eps = []
    for c in cfg.clusters:
        for n in c.nodes:
            if not n.http_port:
                raise ValueError(f"node {n.name}: http_port must be set for `prfaas router`")
            eps.append(NodeEndpoint(n.name, c.name, n.role, n.url))
    return eps


def run_up(
    cfg: DeployConfig,
    host: str,
    port: int,
    smoke: bool = False,
    ready_file: str | None = None,
    log_dir: str | None = None,
    log_level: str = "warning",
) -> int:
    run_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="prfaas-up-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    masters = start_pool_masters(cfg, run_dir)
    n = sum(len(c.nodes) for c in cfg.clusters)
    print(f"starting {n} node processes (logs in {run_dir}) ...", flush=True)
    try:
        procs = start_nodes(cfg, run_dir)
    except BaseException:
        stop_pool_masters(masters)
        raise
    try:
        for np_ in procs:
            i = np_.info
            assert i is not None
            kv = f", KV {i.host}:{i.kv_port}" if i.kv_port else ""
            print(
                f"  {i.cluster:>8}/{i.name:<10} {i.role:<8} http://{i.host}:{i.http_port}{kv} (pid {i.pid})"
            )
        for lk in cfg.links:
            print(
                f"  link {lk.src}->{lk.dst}: {lk.nominal_gbps} Gbps, RTT {lk.rtt_ms} ms (emulated)"
            )
        extra = {
            "nodes": [np_.info.model_dump() for np_ in procs if np_.info],
            "run_dir": str(run_dir),
        }
        try:
            return asyncio.run(
                serve_gateway(
                    cfg,
                    endpoints_from_procs(procs),
                    host,
                    port,
                    smoke,
                    ready_file,
                    log_level,
                    extra,
                )
            )
        except KeyboardInterrupt:
            return 0
    finally:
        print("stopping nodes ...", flush=True)
        stop_nodes(procs)
        stop_pool_masters(masters)
        print("stopped.", flush=True)


def start_pool_masters(cfg: DeployConfig, run_dir: Path) -> list[MooncakeMaster]:
    """With ``prefix_pool`` on: one ``mooncake_master`` per cluster without a pool address (bound
    to 127.0.0.1 on free ports); fills the addresses into ``cfg``."""
    masters: list[MooncakeMaster] = []
    if not cfg.prefix_pool:
        return masters
    from prfaas.cache.pool_mooncake import MooncakeMaster

    try:
        for c in cfg.clusters:
            if c.pool_master:
                continue
            m = MooncakeMaster("127.0.0.1", run_dir / f"{c.name}.mooncake_master.log").start()
            masters.append(m)
            c.pool_master, c.pool_metadata = m.address.master, m.address.metadata
            print(f"  {c.name:>8} prefix pool: mooncake_master {c.pool_master}", flush=True)
    except BaseException:
        stop_pool_masters(masters)
        raise
    return masters


def stop_pool_masters(masters: list[MooncakeMaster]) -> None:
    for m in masters:
        m.stop()
