"""One engine in one dedicated thread: drain the command queue, ``step()``, publish outputs.

The engine is not thread-safe, so everything that touches it runs here: ``call(fn)`` queues
``fn(engine)`` and returns a future; ``subscribe(rid, fn)`` gets every output of a request (called in
this thread: hand over to asyncio with ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from prfaas.engine import LLMEngine, RequestOutput

log = logging.getLogger("prfaas.server")
OutputCallback = Callable[[RequestOutput], None]


class EngineWorker:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._subs: dict[str, OutputCallback] = {}
        self._idle_hooks: list[Callable[[LLMEngine], None]] = []  # run every loop (pending imports)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine")
        self.steps = 0

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- API (any thread) -------------------------------------------------------------------
    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put((fn, fut))
        return fut

    async def acall(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    def subscribe(self, rid: str, fn: OutputCallback) -> None:
        """Route the outputs of ``rid`` to ``fn`` (set before the request can produce any)."""
        self._subs[rid] = fn

    def unsubscribe(self, rid: str) -> None:
        self._subs.pop(rid, None)

    def add_loop_hook(self, fn: Callable[[LLMEngine], None]) -> None:
        self._idle_hooks.append(fn)

    # ---- the thread ------------------------------------------------------------------------
    def _run_cmd(self, item: tuple) -> None:
        fn, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self.engine))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    def _publish(self, out: RequestOutput) -> None:
        fn = self._subs.get(out.request_id)
        if fn is None:
            return
        if out.finished:
            self._subs.pop(out.request_id, None)
        try:
            fn(out)
        except Exception:  # a consumer bug must not kill the engine
            log.exception("output callback failed for %s", out.request_id)

    def _run(self) -> None:
        eng = self.engine
        dev = getattr(eng, "device", None)
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            import torch

            torch.cuda.set_device(dev)  # this thread's current device: the engine's (cuda:1 ...)
        while not self._stop.is_set():
            try:  # idle: wait for a command (briefly, so loop hooks still run)
                item = (
                    self._cmds.get_nowait()
                    if eng.has_unfinished()
                    else self._cmds.get(timeout=0.05)
                )
            except queue.Empty:
                item = None
            while item is not None:  # drain every queued command first
                self._run_cmd(item)
                try:
                    item = self._cmds.get_nowait()
                except queue.Empty:
                    item = None
            if self._stop.is_set():
                return
            for hook in self._idle_hooks:
                try:
                    hook(eng)
                except Exception:
                    log.exception("engine loop hook failed")
            try:
                outs = eng.step()  # cheap when idle: returns outputs of aborts, if any
            except Exception as e:  # the step's requests end; the others go on
                log.exception("engine step failed; aborting its requests")
                outs = eng.fail_step(e)
            self.steps += 1
            for out in outs:
                self._publish(out)
