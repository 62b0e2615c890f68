"""A fake OpenAI-compatible streaming server with deterministic timing, for testing the client.

Every request streams ``max_tokens`` one-character tokens: the first ``ttft_s`` after the request
arrives, then one every ``itl_s`` (absolute deadlines, so no drift). Requests are numbered in
arrival order (0, 1, ...); ``fail_status`` answers chosen ones with an HTTP error and ``stall_s``
delays chosen ones before their first token. ``routing`` adds ``x-prfaas-*`` headers and a
``prfaas`` object in the last chunk. ``python -m prfaas.bench.fake_server --port 8000`` serves one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class FakeServerSpec:
    """Timing and behaviour of the fake server."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    model: str = "fake-model"
    fail_status: dict[int, int] = field(default_factory=dict)  # arrival number -> HTTP status
    stall_s: dict[int, float] = field(default_factory=dict)  # arrival number -> extra TTFT
    # arrival number -> routing info (headers x-prfaas-*, and the body's "prfaas" object)
    routing: Callable[[int], dict[str, Any]] | None = None


@dataclass
class Received:
    """A request the fake server saw: arrival number, time (perf_counter), path, JSON body and the
    client's port (one per connection)."""

    number: int
    t: float
    path: str
    body: dict[str, Any]
    client_port: int | None = None


def make_app(spec: FakeServerSpec, record: bool = True) -> tuple[FastAPI, list[Received]]:
    """The app and the (growing) list of requests it has received (``record=False``: bodies are
    not kept, for long load runs)."""
    app = FastAPI()
    seen: list[Received] = []
    lock = threading.Lock()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": spec.model, "object": "model"}]}

    async def handle(request: Request, chat: bool) -> Any:
        t_arr = time.perf_counter()
        body = await request.json()
        with lock:
            n = len(seen)
            port = request.client.port if request.client else None
            seen.append(Received(n, t_arr, request.url.path, body if record else {}, port))
        if n in spec.fail_status:
            code = spec.fail_status[n]
            return JSONResponse({"error": {"message": f"fake error {code}"}}, status_code=code)
        max_tokens = int(body.get("max_tokens") or 16)
        info = spec.routing(n) if spec.routing else {}
        headers = {f"x-prfaas-{k.replace('_', '-')}": str(v) for k, v in info.items()}
        obj = "chat.completion.chunk" if chat else "text_completion"
        loop = asyncio.get_running_loop()
        t0 = loop.time() - (time.perf_counter() - t_arr)  # the arrival, on the loop's clock

        def chunk(text: str | None, finish: str | None = None, **extra: Any) -> str:
            if chat:
                delta = {"role": "assistant"} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            d = {"id": f"fake-{n}", "object": obj, "model": spec.model, "choices": [choice]}
            d.update(extra)
            return f"data: {json.dumps(d)}\n\n"

        async def gen() -> AsyncIterator[str]:
            if chat:
                yield chunk(None)  # role-only chunk: not a token
            first = t0 + spec.ttft_s + spec.stall_s.get(n, 0.0)
            for k in range(max_tokens):
                delay = first + k * spec.itl_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield chunk("ab"[k % 2])
            yield chunk("", "length", **({"prfaas": info} if info else {}))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": len(str(body.get("prompt", ""))),
                    "completion_tokens": max_tokens,
                    "total_tokens": len(str(body.get("prompt", ""))) + max_tokens,
                }
                yield f"data: {json.dumps({'id': f'fake-{n}', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app, seen


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread on a free port; yields the base URL."""
    import uvicorn

    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (else
    # Nagle + delayed ACK hold each reused connection's first chunk for 40 ms)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not th.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        th.join(timeout=5.0)
        sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fake OpenAI-compatible streaming server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ttft", type=float, default=0.05, help="seconds to the first token")
    ap.add_argument("--itl", type=float, default=0.01, help="seconds between tokens")
    a = ap.parse_args(argv)
    import uvicorn

    app, _ = make_app(FakeServerSpec(ttft_s=a.ttft, itl_s=a.itl), record=False)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
