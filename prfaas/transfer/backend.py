"""The transport interface every backend implements and the records it reports.

A backend provides a ``Sender`` (``open(peer, header) -> SenderStream``; ``stream.send(part)`` per
layer, ``stream.finish()``, ``stream.wait()``) and a ``Receiver`` (listens, authenticates peers,
validates and assembles requests, then hands each complete ``KVExport`` or failure out once: to its
callbacks if it has them, else on its ``deliveries`` queue; with ``on_layer``, each verified layer
is also handed out as it lands, before the delivery). Backends are made by name through
``prfaas.transfer.registry``. Times are ``time.time()`` seconds, sizes bytes.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prfaas.kv.unit import KVExport, LayerPart, TransferHeader
from prfaas.transfer.errors import TransferError
from prfaas.transfer.meter import LinkSnapshot

Peer = tuple[str, int]


@dataclass
class TransferTimings:
    """Receiver-side timings of one request (``time.time()`` seconds)."""

    request_id: str
    header_at: float  # header frame fully read (first byte of the request, to within a frame)
    first_data_at: float | None  # first layer byte in
    last_byte_at: float  # last layer byte in (before checksum verification)
    delivered_at: float  # handed to the consumer
    payload_bytes: int
    wire_bytes: int  # bytes read from our TCP connections for this request


@dataclass
class SendStats:
    """Sender-side accounting of one request."""

    request_id: str
    header_bytes: int = 0  # the HEADER frame, prefix included
    payload_bytes: int = 0  # tensor bytes of the layers sent
    framing_bytes: int = 0  # DATA/COMMIT prefixes and sub-headers
    data_frames: int = 0
    commit_frames: int = 0
    bulk_bytes: int = 0  # payload moved outside our TCP connections (mooncake)
    opened_at: float = 0.0
    finished_at: float | None = None  # finish() called (prefill end)
    last_byte_sent_at: float | None = None
    acked_at: float | None = None  # receiver confirmed delivery

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes + self.framing_bytes

    @property
    def socket_bytes(self) -> int:
        """Bytes written to our TCP connections for this request."""
        return self.total_bytes - self.bulk_bytes


@dataclass
class Delivery:
    """A complete, verified request. Its tensors are views of one receive buffer: call
    ``release()`` once they are copied into the cache so the buffer is reused (optional)."""

    export: KVExport
    timings: TransferTimings
    peer: Peer | None = None
    release_fn: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Hand the receive buffer back to the receiver's pool; the tensors become invalid."""
        fn, self.release_fn = self.release_fn, None
        if fn is not None:
            fn()


@dataclass
class TransferFailure:
    request_id: str | None  # None when the failure is not tied to one request (auth, framing)
    error: TransferError
    peer: Peer | None = None


@dataclass
class LayerArrival:
    """One verified layer of a request still being received (``Receiver`` built with
    ``on_layer``): its tensors are views of the request's receive buffer, valid until the
    request's ``Delivery`` is released (or, if the request fails, while referenced)."""

    header: TransferHeader
    part: LayerPart
    peer: Peer | None = None


DeliveryCallback = Callable[[Delivery], Any]
LayerCallback = Callable[[LayerArrival], Any]
FailureCallback = Callable[[TransferFailure], Any]


class SenderStream(ABC):
    """One request being sent: ``send(part)`` per layer (queues, no network wait), ``finish()``
    once all layers were given, ``wait()`` for the receiver's acknowledgement (raises the
    ``TransferError`` that ended it otherwise), ``abort()`` to give up."""

    request_id: str
    stats: SendStats

    @abstractmethod
    def send(self, part: LayerPart) -> None: ...

    @abstractmethod
    def finish(self) -> None: ...

    @abstractmethod
    def wait(self, timeout: float | None = None) -> SendStats: ...

    @abstractmethod
    def abort(self, reason: str = "aborted by sender") -> None: ...

    @property
    @abstractmethod
    def done(self) -> bool: ...


class Sender(ABC):
    """Opens streams to receivers (one authenticated session per peer, made on first use)."""

    @abstractmethod
    def open(self, peer: Peer, header: TransferHeader) -> SenderStream:
        """Announce a request to ``peer``; its layers follow with ``stream.send``."""

    @abstractmethod
    def send_export(self, peer: Peer, export: KVExport) -> SenderStream:
        """Send a complete export; returns its (finished) stream."""

    @abstractmethod
    def snapshot(self, peer: Peer) -> LinkSnapshot:
        """Live link figures for ``peer``."""

    @abstractmethod
    def close(self) -> None: ...


class Receiver(ABC):
    """Listens for senders; validates, assembles and verifies requests.

    One delivery path: every outcome (a complete ``Delivery`` or a ``TransferFailure``) is handed
    out exactly once, to ``on_delivery`` / ``on_failure`` when the receiver was built with them,
    otherwise on the ``deliveries`` queue.
    """

    deliveries: queue.Queue[Delivery | TransferFailure]

    @abstractmethod
    def start(self) -> Receiver: ...

    @property
    @abstractmethod
    def address(self) -> Peer: ...

    @property
    @abstractmethod
    def inflight_bytes(self) -> int:
        """Bytes of receive buffers held by unfinished requests."""

    @abstractmethod
    def close(self) -> None: ...
