"""``prfaas up``: start a whole deployment on one machine (node processes + the gateway), and the
gateway on its own (``prfaas router``) for multi-machine deployments."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from prfaas.cache.pool_mooncake import MooncakeMaster
from prfaas.server.api import build_gateway_app
from prfaas.server.config import DeployConfig
from prfaas.server.node import bind_socket
from prfaas.server.router import NodeEndpoint, Router


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    log_file: Path
    info: dict[str, Any] | None = None


def write_config(cfg: DeployConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
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
            np_.info = json.loads(np_.ready_file.read_text())
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
        i = np_.info or {}
        eps.append(
            NodeEndpoint(i["name"], i["cluster"], i["role"], f"http://{i['host']}:{i['http_port']}")
        )
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


SMOKE_PROMPTS = [
    ("short prompt (PD-P)", "Hello, prfaas! "),
    ("long prompt (PrfaaS)", "PrfaaS offloads long prefills across datacenters. " * 8),
    (
        "long prompt, shared prefix (PrfaaS, only the tail crosses)",
        "PrfaaS offloads long prefills across datacenters. " * 8 + "And a new question?",
    ),
]


async def run_smoke(url: str, model: str) -> int:
    """Send a few requests through the gateway and print what happened; 0 if all worked."""
    ok = True
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for label, prompt in SMOKE_PROMPTS:
            r = await c.post(
                "/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0},
            )
            if r.status_code != 200:
                print(f"[{label}] HTTP {r.status_code}: {r.text}")
                ok = False
                continue
            b = r.json()
            p = b["prfaas"]
            print(
                f"[{label}] {b['usage']['prompt_tokens']} prompt tokens -> prefill {p['prefill_cluster']}"
                f"/{p['prefill_node']}, decode {p['decode_node']}, cached {p['cached_tokens']}, "
                f"decode-side prefix {p['decode_prefix_tokens']}, KV {p['transfer_bytes']} B in "
                f"{p['transfer_ms']:.1f} ms; {b['usage']['completion_tokens']} tokens: "
                f"{b['choices'][0]['text']!r}"
            )
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 8,
                "stream": True,
                "seed": 1,
            },
        )
        chunks = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        done = r.status_code == 200 and chunks and chunks[-1] == "data: [DONE]"
        print(
            f"[chat, streamed] HTTP {r.status_code}, {len(chunks)} SSE events, ends with [DONE]: {bool(done)}"
        )
        ok = ok and bool(done)
        m = await c.get("/metrics")
        print(
            f"[metrics] {sum(1 for ln in m.text.splitlines() if ln.startswith('prfaas_'))} prfaas_* samples"
        )
    return 0 if ok else 1


async def serve_gateway(
    cfg: DeployConfig,
    endpoints: list[NodeEndpoint],
    host: str,
    port: int,
    smoke: bool = False,
    ready_file: str | None = None,
    log_level: str = "warning",
    extra_ready: dict[str, Any] | None = None,
) -> int:
    router = Router(cfg, endpoints)
    app = build_gateway_app(router)
    sock = bind_socket(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if task.done():
        await task
        return 1
    print(
        f"prfaas gateway ready: {url}  (OpenAI API at {url}/v1; Ctrl-C stops everything)",
        flush=True,
    )
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), **(extra_ready or {})}))
        tmp.rename(ready_file)
    rc = 0
    if smoke:
        try:
            rc = await run_smoke(url, cfg.model)
        finally:
            server.should_exit = True
    await task
    return rc


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
            i = np_.info or {}
            kv = f", KV {i['host']}:{i['kv_port']}" if i.get("kv_port") else ""
            print(
                f"  {i['cluster']:>8}/{i['name']:<10} {i['role']:<8} http://{i['host']}:{i['http_port']}{kv} (pid {i['pid']})"
            )
        for lk in cfg.links:
            print(
                f"  link {lk.src}->{lk.dst}: {lk.nominal_gbps} Gbps, RTT {lk.rtt_ms} ms (emulated)"
            )
        extra = {"nodes": [np_.info for np_ in procs], "run_dir": str(run_dir)}
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
