"""Layer-wise streaming of a prefill node's caches: each request's layer ``i`` goes on the wire as soon
as the last prefill chunk has written it, while layer ``i + 1`` computes (the engine's
``layer_listener``). Requests with nothing left to compute (whole prefix cached) are sent whole.

This module sits between a prefill engine and a transfer sender and imports neither: it needs only
what ``PrefillEngine`` and ``KVSender`` below describe (``prfaas.engine.LLMEngine`` and the transfer
senders satisfy them), so the transfer layer never depends on the engine.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prfaas.kv.unit import KVExport, LayerPart, TransferHeader

Peer = tuple[str, int]


class PrefilledRequest(Protocol):
    request_id: str
    kv_start: int
    params: Any  # a dataclass (sampling parameters): travels in the header's meta


class PrefillEngine(Protocol):
    """What the streamer needs of a prefill-role engine."""

    layer_listener: Callable[[Any, LayerPart], None] | None
    prefilled: dict[str, Any]

    def make_header(self, req: Any, token_start: int) -> TransferHeader: ...

    def export_request(self, request_id: str, token_start: int) -> KVExport: ...

    def release(self, request_id: str) -> None: ...


class KVStream(Protocol):
    """One request being sent (``prfaas.transfer.sender.SenderStream``)."""

    def send(self, part: LayerPart) -> None: ...

    def finish(self) -> None: ...


class KVSender(Protocol):
    """What the streamer needs of a transfer sender (``prfaas.transfer.backend.Sender``)."""

    def open(self, peer: Peer, header: TransferHeader) -> Any: ...

    def send_export(self, peer: Peer, export: KVExport) -> Any: ...


@dataclass
class StreamedRequest:
    stream: Any  # the sender's stream (SenderStream): wait() for the receiver's ack
    opened_at: float
    layers_sent: int = 0
    finished_at: float | None = None  # the last layer was queued (≈ the prefill's end)
    whole: bool = False  # sent after the prefill in one go (nothing was computed in a step)


class LayerStreamer:
    """Attach to a prefill-role engine; ``expect(request_id, peer)`` before (or right after)
    ``add_request``; ``handoff(request_id)`` once the engine reports it prefilled returns the stream
    (opening and sending it whole if the listener never ran) and releases the engine's cache."""

    def __init__(self, engine: PrefillEngine, sender: KVSender, num_layers: int | None = None):
        cfg = getattr(engine, "config", None)
        if cfg is not None and getattr(cfg, "role", "prefill") != "prefill":
            raise ValueError("layer-wise streaming needs a prefill-role engine")
        if num_layers is None:
            num_layers = engine.model_config.num_hidden_layers  # type: ignore[attr-defined]
        self.engine, self.sender = engine, sender
        self.num_layers = num_layers
        self._dest: dict[str, Peer] = {}
        self._streams: dict[str, StreamedRequest] = {}
        self._lock = threading.Lock()
        engine.layer_listener = self._on_layer

    def expect(self, request_id: str, peer: Peer) -> None:
        with self._lock:
            self._dest[request_id] = peer

    def _header(self, req: PrefilledRequest) -> TransferHeader:
        h = self.engine.make_header(req, req.kv_start)
        h.meta["params"] = dataclasses.asdict(req.params)
        return h

    def _on_layer(self, req: PrefilledRequest, part: LayerPart) -> None:  # engine thread
        rid = req.request_id
        with self._lock:
            peer = self._dest.get(rid)
            st = self._streams.get(rid)
        if peer is None:
            return
        if st is None:
            st = StreamedRequest(self.sender.open(peer, self._header(req)), time.monotonic())
            with self._lock:
                self._streams[rid] = st
        st.stream.send(part)  # queues; the network work runs on the sender's threads
        st.layers_sent += 1
        if st.layers_sent == self.num_layers:
            st.stream.finish()
            st.finished_at = time.monotonic()

    def cancel(self, request_id: str, reason: str = "prefill cancelled") -> None:
        """Forget ``request_id`` (any thread): abort its stream if one was opened."""
        with self._lock:
            self._dest.pop(request_id, None)
            st = self._streams.pop(request_id, None)
        if st is not None:
            st.stream.abort(reason)

    def handoff(self, request_id: str) -> StreamedRequest:
        """Call when the engine reports ``request_id`` prefilled (engine thread)."""
        with self._lock:
            peer = self._dest.pop(request_id, None)
            st = self._streams.pop(request_id, None)
        if peer is None:
            raise KeyError(f"no destination for {request_id!r}")
        try:
            if st is None:  # nothing was computed in a step: send the export whole
                req = self.engine.prefilled[request_id]
                exp = self.engine.export_request(request_id, req.kv_start)
                exp.header.meta["params"] = dataclasses.asdict(req.params)
                now = time.monotonic()
                st = StreamedRequest(
                    self.sender.send_export(peer, exp), now, self.num_layers, now, whole=True
                )
        finally:
            self.engine.release(request_id)  # parts were copied out: the cache is free again
        return st
