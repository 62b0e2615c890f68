"""HTTP plumbing shared by the gateway and the nodes (no torch): a streaming response that always
learns how it ended, and waiting for a client to go away.

Contract of :class:`ClosingStreamingResponse`: ``on_close(completed)`` runs exactly once when the
response is over, whether the body ran to its end (``completed`` true), the client disconnected
(before the first byte or mid-stream), sending failed, or the body raised; it runs synchronously
(no awaits), so a cancellation cannot skip it.  The client's disconnect is watched during the whole
response, independently of the ASGI spec version the server announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("prfaas.server")


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` with a guaranteed ``on_close(completed: bool)`` (see module doc)."""

    def __init__(
        self, content: Any, on_close: Callable[[bool], None] | None = None, **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    nonlocal completed
                    with contextlib.suppress(OSError):  # the client went away
                        await self.stream_response(send)
                        completed = True
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:  # an interrupted body runs its own clean-up now
                    with contextlib.suppress(Exception):
                        await aclose()
            if self.on_close is not None:
                try:
                    self.on_close(completed)
                except Exception:  # noqa: BLE001 - never mask the response's own outcome
                    log.exception("on_close of a streaming response failed")


async def wait_disconnect(request: Request) -> None:
    """Return once the client of ``request`` disconnected (call after its body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work`` until it ends or the client disconnects, whichever comes first: ``(True,
    result)``, or ``(False, result or None)`` after cancelling ``work`` (its clean-up ran; a
    result it still produced is the caller's to dispose of).  Exceptions of ``work`` propagate
    while the client is there."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    if task.cancelled() or task.exception() is not None:
        return False, None
    return False, task.result()
