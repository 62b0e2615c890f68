"""``prfaas up``: start a whole deployment on one machine: the prefix pools' masters (``prefix_pool``
on), one ``prfaas node`` OS process per node, then the gateway in this process (``gateway.serve``).
Imports no torch itself (the nodes do, in their own processes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
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

log = logging.getLogger("prfaas.server.launcher")


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    log_file: Path
    cmd: list[str]
    info: NodeReady | None = None
    restarts: int = 0


def write_config(cfg: DeployConfig, path: Path) -> Path:
    path.write_text(dump_yaml(cfg.to_dict()))
    return path


def _tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def _spawn(cmd: list[str], log_file: Path) -> subprocess.Popen:
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_nodes(cfg: DeployConfig, run_dir: Path, timeout_s: float = 180.0) -> list[NodeProcess]:
    """One ``prfaas node`` OS process per node of the deployment; returns once all serve.  The
    deployment file the nodes read is then rewritten with the ports they bound, so that a node
    restarted by the :class:`Supervisor` comes back on the same addresses."""
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
                procs.append(NodeProcess(n.name, _spawn(cmd, logf), ready, logf, cmd))
        deadline = time.monotonic() + timeout_s
        for np_ in procs:
            np_.info = _wait_ready(np_, deadline, timeout_s)
    except BaseException:
        stop_nodes(procs)
        raise
    for np_ in procs:  # fixed addresses from now on (restarts keep them)
        _, node = cfg.node(np_.name)
        assert np_.info is not None
        node.http_port = np_.info.http_port
        if np_.info.kv_port:
            node.kv_port = np_.info.kv_port
    write_config(cfg, cfg_path)
    return procs


def _wait_ready(
    np_: NodeProcess, deadline: float, timeout_s: float, stop: threading.Event | None = None
) -> NodeReady:
    while not np_.ready_file.exists():
        if stop is not None and stop.is_set():
            raise RuntimeError(f"node {np_.name}: stopping")
        if np_.proc.poll() is not None:
            raise RuntimeError(
                f"node {np_.name} exited with {np_.proc.returncode}:\n{_tail(np_.log_file)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {np_.name} not ready in {timeout_s} s")
        time.sleep(0.05)
    return NodeReady.model_validate_json(np_.ready_file.read_text())


class Supervisor:
    """Restarts a node process that died (``prfaas up``): checks every ``interval_s``; a dead node
    is restarted after a backoff of ``min_backoff_s`` doubling per consecutive failure up to
    ``max_backoff_s`` (a node that served for ``stable_s`` starts again from the minimum); every
    exit and restart is logged (``log``) and counted (``NodeProcess.restarts``)."""

    def __init__(
        self,
        procs: list[NodeProcess],
        interval_s: float = 0.5,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.procs = procs
        self.interval_s, self.min_backoff_s, self.max_backoff_s = (
            interval_s,
            min_backoff_s,
            max_backoff_s,
        )
        self.stable_s, self.ready_timeout_s = stable_s, ready_timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while a process is replaced (stop_nodes waits)
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-supervisor")
        self._started_at = {np_.name: time.monotonic() for np_ in procs}
        self._failures = dict.fromkeys((np_.name for np_ in procs), 0)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No more restarts (call before stopping the nodes)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for np_ in self.procs:
                if np_.proc.poll() is not None and not self._stop.is_set():
                    self._restart(np_)

    def _restart(self, np_: NodeProcess) -> None:
        code = np_.proc.returncode
        lived = time.monotonic() - self._started_at[np_.name]
        if lived >= self.stable_s:
            self._failures[np_.name] = 0
        k = self._failures[np_.name]
        backoff = min(self.max_backoff_s, self.min_backoff_s * 2**k)
        log.warning(
            "node %s (pid %s) exited with code %s after %.1f s; restarting in %.1f s (restart %d)",
            np_.name,
            np_.proc.pid,
            code,
            lived,
            backoff,
            np_.restarts + 1,
        )
        if self._stop.wait(backoff):
            return
        with self._lock:
            if self._stop.is_set():
                return
            with contextlib.suppress(FileNotFoundError):
                np_.ready_file.unlink()
            np_.proc = _spawn(np_.cmd, np_.log_file)
            np_.restarts += 1
            self._started_at[np_.name] = time.monotonic()
        try:
            deadline = time.monotonic() + self.ready_timeout_s
            np_.info = _wait_ready(np_, deadline, self.ready_timeout_s, self._stop)
        except RuntimeError as e:
            self._failures[np_.name] = k + 1
            log.warning("restart of node %s failed: %s", np_.name, str(e).splitlines()[0])
            return
        self._failures[np_.name] = k + 1 if lived < self.stable_s else 0
        log.warning("node %s is back (pid %s)", np_.name, np_.info.pid)


def stop_nodes(
    procs: list[NodeProcess], timeout_s: float = 10.0, supervisor: Supervisor | None = None
) -> None:
    if supervisor is not None:
        supervisor.stop()
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
    api_key: str | None = None,
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
    supervisor: Supervisor | None = None
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
        supervisor = Supervisor(procs).start()  # a node that dies is restarted (same ports)
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
                    api_key,
                )
            )
        except KeyboardInterrupt:
            return 0
    finally:
        print("stopping nodes ...", flush=True)
        stop_nodes(procs, supervisor=supervisor)
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


@contextlib.contextmanager
def up_in_subprocess(
    config: dict,
    run_dir: Path,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
    cwd: Path | None = None,
):
    """Run ``prfaas up`` on ``config`` (a deployment mapping, written to ``run_dir/deploy.yaml``) as
    a subprocess (this interpreter, loopback ports picked at start-up), for tests and benchmarks.
    Yields the gateway's ready file (``url``, ``nodes``) plus ``proc`` and ``dir``; stops everything
    with Ctrl-C on exit (killed after ``stop_timeout_s``).  RuntimeError, with the log, if the
    deployment does not come up within ``start_timeout_s``."""
    import json

    import yaml

    run_dir = Path(run_dir)
    cfg = run_dir / "deploy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    ready = run_dir / "gateway.json"
    with open(run_dir / "up.log", "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prfaas.cli", "up", "--config", str(cfg), "--port", "0"]
            + ["--ready-file", str(ready), "--log-dir", str(run_dir / "logs")],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prfaas up did not start: {_tail(run_dir / 'up.log')}")
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        info["proc"], info["dir"] = proc, run_dir
        yield info
    finally:
        if proc.poll() is None:  # Ctrl-C stops everything cleanly
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
