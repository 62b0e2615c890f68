"""``prfaas node``: one node as its own OS process, until SIGINT/SIGTERM (or its parent exits)."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import NoReturn

import uvicorn

from prfaas.server.config import DeployConfig
from prfaas.server.node.server import NodeServer
from prfaas.server.protocol import NodeReady
from prfaas.server.sockets import (
    bind_socket,
    exit_now,
    exit_with_parent,
    install_sigterm_as_interrupt,
    write_ready_file,
)


def run_node(
    cfg: DeployConfig,
    node_name: str,
    ready_file: str | None = None,
    parent_pid: int | None = None,
    log_level: str = "warning",
) -> NoReturn:
    """Run one node until SIGINT/SIGTERM, then exit the process (no interpreter teardown); writes its ports (``NodeReady``) to ``ready_file`` once
    serving (to stdout without one)."""
    server = NodeServer(cfg, node_name).start()
    sock = bind_socket(server.node.host, server.node.http_port)
    http_port = sock.getsockname()[1]
    if parent_pid:
        exit_with_parent(parent_pid)
    ucfg = uvicorn.Config(server.app, log_level=log_level, lifespan="off", access_log=False)
    userver = uvicorn.Server(ucfg)
    info = NodeReady(
        name=node_name,
        cluster=server.cluster.name,
        role=server.role,
        host=server.node.host,
        http_port=http_port,
        kv_port=server.kv_port,
        pid=os.getpid(),
    )

    async def serve() -> None:
        task = asyncio.create_task(userver.serve(sockets=[sock]))
        while not userver.started and not task.done():
            await asyncio.sleep(0.02)
        # the model, caches and server objects live as long as the process: keep them out of
        # full garbage collections (one froze a KV receive thread for ~170 ms every ~20 requests)
        gc.collect()
        gc.freeze()
        if ready_file and userver.started:
            write_ready_file(ready_file, info.model_dump_json())
        else:
            print(info.model_dump_json(), flush=True)
        await task

    install_sigterm_as_interrupt()
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    exit_now(0)
