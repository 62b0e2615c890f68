"""The gateway process's server: the API app on a bound socket under uvicorn (``serve_gateway``,
used by ``prfaas router`` and ``prfaas up``) and the ``--smoke`` requests."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn

from prfaas.server.config import DeployConfig
from prfaas.server.gateway.api import build_gateway_app
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.router import Router
from prfaas.server.sockets import bind_socket, write_ready_file

GRACE_S = 1  # stopping: requests in flight get this long to finish, then they are cancelled


class GatewayServer(uvicorn.Server):
    """uvicorn's server that, once it begins to stop (Ctrl-C, SIGTERM), tells the app
    (``app.state.begin_shutdown``, set by ``build_gateway_app``) so its responses still running
    end at once (503 or a last SSE error event) rather than holding the exit; whatever is left
    after ``GRACE_S`` is cancelled by uvicorn."""

    on_started: Callable[[], None] | None = None  # once serving (not when stopped during start-up)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            # a second Ctrl-C: uvicorn stops at once and asyncio cancels the app's lifespan
            # task, which uvicorn would log as a traceback; the user asked to stop, say nothing
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin = getattr(getattr(self.config.app, "state", None), "begin_shutdown", None)
        if begin is not None:
            begin()
        await super().shutdown(sockets)


def gateway_server(
    app: Any, log_level: str = "warning", on_started: Callable[[], None] | None = None
) -> GatewayServer:
    """The uvicorn server of a gateway app (no access log: the app logs one line per request);
    ``on_started`` runs once it serves.  Await its ``serve()`` as the main coroutine: uvicorn
    then owns Ctrl-C from the start, so an interrupt during start-up stops it cleanly too."""
    cfg = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
    )
    server = GatewayServer(cfg)
    server.on_started = on_started
    return server


SMOKE_PROMPTS = [
    ("short prompt (PD-P)", "Hello, prfaas! "),
    ("long prompt (PrfaaS)", "PrfaaS offloads long prefills across datacenters. " * 20),
    (
        "long prompt, shared prefix (PrfaaS, only the tail crosses)",
        "PrfaaS offloads long prefills across datacenters. " * 20 + "And a new question?",
    ),
]


async def run_smoke(url: str, model: str, api_key: str | None = None) -> int:
    """Send a few requests through the gateway and print what happened; 0 if all worked."""
    ok = True
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as c:
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
    api_key: str | None = None,
) -> int:
    """Serve the gateway until stopped; ``api_key``: what ``/v1`` and ``/admin`` require
    (``prfaas.server.auth``; None: open)."""
    router = Router(cfg, endpoints)
    app = build_gateway_app(router, api_key=api_key)
    sock = bind_socket(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = gateway_server(app, log_level)
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
        write_ready_file(
            ready_file, json.dumps({"url": url, "pid": os.getpid(), **(extra_ready or {})})
        )
    rc = 0
    if smoke:
        try:
            rc = await run_smoke(url, cfg.model, api_key)
        finally:
            server.should_exit = True
    await task
    return rc
