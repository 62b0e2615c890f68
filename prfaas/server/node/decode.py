"""The decode role: wait for a request's KV, import it, stream the new tokens.

A decode starts with ``open`` (the route ``POST /internal/decode``): the engine holds the request
waiting for its KV (``LLMEngine.expect_kv``, which answers how much of the prompt this node
already holds: ``token_start``) and the node records an :class:`Expectation` (the stream's event
queue); the prefill node then sends the KV from there to this node's receiver. Each layer goes to
the engine as soon as it is in and verified (``import_layer``: written into the request's blocks
while later layers are still on the wire); the delivery then goes to the engine (``import_kv``),
which writes the layers not written yet once a slot and blocks are free and hands the receive
buffer back (``Delivery.release``) through the import's ``on_done``. Events go to the stream as
protocol messages (``ready``, ``kv`` or ``kv_error``, ``token`` ..., the last one ``finished``;
``error`` when aborted or the request failed in the engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prfaas.engine import LLMEngine, RequestOutput, SamplingParams
from prfaas.kv.layout import CacheLayout
from prfaas.server.config import DeployConfig, NodeConfig
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.node.wire import engine_params, wall_time
from prfaas.server.protocol import (
    DecodeRequest,
    ErrorEvent,
    KVErrorEvent,
    KVEvent,
    Message,
    NodeCounters,
    ReadyEvent,
    TokenEvent,
    TokenLogprobMsg,
    event_line,
)
from prfaas.transfer.backend import Delivery, LayerArrival, TransferFailure
from prfaas.transfer.registry import create_receiver

log = logging.getLogger("prfaas.server.node")


FINISH_REASONS = ("stop", "length")  # what a finished decode may end with (OpenAI's)
ABORTED_MEMORY = 4096  # aborted request ids remembered (an open may arrive after its abort)


class Overloaded(Exception):
    """The node already waits for as many requests as it accepts."""


class Aborted(Exception):
    """The request was aborted (by the router) before or while this node served it."""


@dataclass
class Expectation:
    """A request the decode node waits the KV cache of."""

    rid: str
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    finished: bool = False
    dropped: bool = False  # the stream is over: the engine no longer serves it
    sent: int = 0

    def push(self, ev: Message) -> None:  # any thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def on_output(self, out: RequestOutput) -> None:  # engine thread
        if out.finished and out.finish_reason not in FINISH_REASONS:
            # the request failed in the engine (or its engine step did): an error, never a
            # truncated answer with a made-up finish reason
            self.finished = True
            code = "request_failed" if out.finish_reason == "error" else "decode_failed"
            msg = out.error or f"the engine ended the request ({out.finish_reason})"
            self.push(ErrorEvent(message=f"{msg}", code=code))
            return
        new = out.token_ids[self.sent :]
        first_at = None
        m = out.metrics
        if new and not self.sent and m is not None and m.first_token is not None:
            first_at = wall_time(m.first_token)  # the engine sampled it (time.time())
        lps = None
        if out.logprobs is not None:
            lps = [
                TokenLogprobMsg(token_id=lp.token_id, logprob=lp.logprob, top=list(lp.top))
                for lp in out.logprobs[self.sent :]
            ]
        self.sent = len(out.token_ids)
        if out.finished:
            self.finished = True
        self.push(
            TokenEvent(
                token_ids=list(new),
                logprobs=lps,
                finished=out.finished,
                finish_reason=out.finish_reason,
                first_token_at=first_at,
            )
        )


class DecodeSide:
    """KV in: the receiver and the event streams of the requests whose KV the engine waits for."""

    def __init__(
        self,
        cfg: DeployConfig,
        node: NodeConfig,
        worker: EngineWorker,
        layout: CacheLayout,
        counters: NodeCounters,
    ) -> None:
        self.cfg, self.node, self.worker = cfg, node, worker
        self.layout, self.counters = layout, counters
        self.expect: dict[str, Expectation] = {}
        self.receiver = None
        self.kv_port = 0
        self.max_expect = 4 * worker.engine.config.max_num_seqs
        self.aborted: OrderedDict[str, None] = OrderedDict()  # recent aborts (refuse late opens)
        # engine thread: per request, layers written as they landed and when the last one was
        self.landed: dict[str, tuple[int, float]] = {}

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.receiver = create_receiver(
            self.cfg.transfer_backend,
            self.layout,
            self.cfg.secret,
            host=self.node.host,
            port=self.node.kv_port,
            on_delivery=self._on_delivery,
            on_failure=self._on_failure,
            on_layer=self._on_layer,
            # pinned receive buffers on a GPU node (torch's host allocator caches them)
            pin_memory=self.worker.engine.device.type == "cuda",
        ).start()
        self.kv_port = self.receiver.address[1]

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()

    # ---- the route's work -------------------------------------------------------------------
    async def open(self, req: DecodeRequest) -> tuple[Expectation, int]:
        """Expect ``req``'s KV; returns it and the prompt tokens this node already holds.
        ValueError on bad input, Overloaded when the node waits for too many requests."""
        params = engine_params(req.params)
        rid, prompt = req.request_id, req.prompt_token_ids
        if rid in self.expect:
            raise ValueError(f"request {rid!r} already expected")
        if rid in self.aborted:
            raise Aborted(f"request {rid!r} was aborted")
        if len(self.expect) >= self.max_expect:
            raise Overloaded(f"{self.node.name} holds {len(self.expect)} requests")

        exp = Expectation(rid, params, asyncio.get_running_loop(), asyncio.Queue())

        def expect(eng: LLMEngine) -> int:
            token_start = eng.expect_kv(rid, prompt, params, timeout_s=req.kv_timeout_s)
            self.worker.subscribe(rid, exp.on_output)  # before the request can produce any
            return token_start

        self.expect[rid] = exp
        try:
            token_start = await self.worker.acall(expect)
        except BaseException:
            self.expect.pop(rid, None)
            raise
        return exp, token_start

    async def stream(self, exp: Expectation, token_start: int) -> AsyncIterator[bytes]:
        """The NDJSON lines of one decode; aborts the request when the client goes away."""
        try:
            yield event_line(
                ReadyEvent(
                    node=self.node.name,
                    token_start=token_start,
                    kv_addr=(self.node.host, self.kv_port),
                )
            )
            while True:
                ev = await exp.queue.get()
                yield event_line(ev)
                if isinstance(ev, ErrorEvent) or (isinstance(ev, TokenEvent) and ev.finished):
                    break
        finally:
            self.drop(exp)

    def drop(self, exp: Expectation) -> None:
        """The stream of ``exp`` is over (ended, aborted, or its client went away): forget it and,
        unless it finished, abort it in the engine (frees its cache and slot).  Idempotent;
        synchronous (event-loop thread)."""
        if self.expect.get(exp.rid) is exp:
            del self.expect[exp.rid]
        if exp.dropped:
            return
        exp.dropped = True
        if not exp.finished:
            rid = exp.rid
            self.worker.unsubscribe(rid)
            # the engine hands back the buffer of a KV that arrived and was not written yet
            self.worker.call(lambda eng: eng.abort(rid))

    def abort(self, rid: str) -> bool:
        """Abort ``rid`` (the router's call): its stream ends with an error event, the engine
        drops it; a later open of ``rid`` is refused.  True if the node held it."""
        self.aborted[rid] = None
        while len(self.aborted) > ABORTED_MEMORY:
            self.aborted.popitem(last=False)
        exp = self.expect.get(rid)
        if exp is not None:
            exp.push(ErrorEvent(message="aborted by the router", code="aborted"))
            self.drop(exp)
        return exp is not None

    # ---- deliveries -------------------------------------------------------------------------
    def _on_delivery(self, d: Delivery) -> None:  # receiver thread (its one delivery path)
        self.worker.call(lambda eng: self._import(eng, d))

    def _on_layer(self, a: LayerArrival) -> None:  # receiver thread: queue, never wait
        self.worker.call(lambda eng: self._import_layer(eng, a))

    def _import_layer(self, eng: LLMEngine, a: LayerArrival) -> None:  # engine thread
        rid = a.header.request_id
        if eng.import_layer(a.header, a.part):
            n, _ = self.landed.get(rid, (0, 0.0))
            self.landed[rid] = (n + 1, time.time())
            while len(self.landed) > ABORTED_MEMORY:  # requests whose delivery never came
                self.landed.pop(next(iter(self.landed)))

    def _on_failure(self, f: TransferFailure) -> None:
        log.warning("KV transfer failed for %s: %s", f.request_id, f.error)
        rid = f.request_id
        if rid is not None:  # the layers it wrote are of no use: give back the reservation

            def drop(eng: LLMEngine) -> None:
                self.landed.pop(rid, None)
                eng.drop_layers(rid)

            self.worker.call(drop)

    def _import(self, eng: LLMEngine, d: Delivery) -> None:  # engine thread
        h = d.export.header
        exp = self.expect.get(h.request_id)
        t_import = time.time()
        n_landed, landed_at = self.landed.pop(h.request_id, (0, None))

        def done(error: str | None) -> None:  # engine thread: written, or dropped
            # the KV is in the cache (or will never be): the receive buffer goes back to the
            # receiver's pool, where the next request reuses it (pinned on GPU nodes)
            d.release()
            if error is not None:
                self.counters.import_errors += 1
                if exp is not None:
                    exp.push(KVErrorEvent(message=error))
                return
            self.counters.imports += 1
            if exp is None:
                return
            t = d.timings
            exp.push(
                KVEvent(
                    token_start=h.token_start,
                    payload_bytes=t.payload_bytes,
                    wire_bytes=t.wire_bytes,
                    receive_s=t.delivered_at - t.header_at,
                    timings={  # time.time() on this node
                        "header_at": t.header_at,
                        "first_data_at": t.first_data_at,
                        "last_byte_at": t.last_byte_at,
                        "delivered_at": t.delivered_at,
                        "import_start": t_import,  # handed to the engine
                        # layers written as they landed, the last of them at layers_written_at
                        "layers_written_early": float(n_landed),
                        "layers_written_at": landed_at,
                        "import_end": time.time(),  # written (after waiting for room, if any)
                    },
                )
            )

        try:
            eng.import_kv(d.export, done)
        except KeyError:
            log.warning("KV for %s arrived but nobody waits for it; dropped", h.request_id)
            d.release()
        except ValueError as e:  # does not fit this node: the request waits on
            done(str(e))
        except Exception as e:  # noqa: BLE001 - this request fails alone
            log.exception("import of %s failed", h.request_id)
            self.counters.import_errors += 1
            d.release()
            eng.abort(h.request_id)
            if exp is not None:
                exp.finished = True
                exp.push(
                    ErrorEvent(
                        message=f"import failed: {type(e).__name__}: {e}", code="request_failed"
                    )
                )
