"""The transport interface every backend implements, the records it reports, and the registry.

A backend provides a ``Sender`` (``open(peer, header) -> SenderStream``; ``stream.send(part)`` per
layer, ``stream.finish()``, ``stream.wait()``) and a ``Receiver`` (listens, authenticates peers,
validates and assembles requests, then hands a complete ``KVExport`` to ``on_delivery`` and its
``deliveries`` queue; failures go to ``on_failure`` and the same queue).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prfaas.transfer.errors import TransferError
from prfaas.transfer.unit import KVExport

if TYPE_CHECKING:
    from prfaas.transfer.receiver import ReceiverBase
    from prfaas.transfer.sender import SenderBase

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


DeliveryCallback = Callable[[Delivery], Any]
FailureCallback = Callable[[TransferFailure], Any]


def backend_names() -> list[str]:
    return ["tcp", "mooncake"]


def _classes(name: str) -> tuple[type[SenderBase], type[ReceiverBase]]:
    if name == "tcp":
        from prfaas.transfer.tcp import TcpReceiver, TcpSender

        return TcpSender, TcpReceiver
    if name == "mooncake":
        from prfaas.transfer.mooncake_backend import MooncakeReceiver, MooncakeSender

        return MooncakeSender, MooncakeReceiver
    raise ValueError(f"unknown transfer backend {name!r}; choose from {backend_names()}")


def create_sender(backend: str, *args: Any, **kwargs: Any) -> SenderBase:
    """A sender of the named backend (arguments as ``SenderBase``)."""
    return _classes(backend)[0](*args, **kwargs)


def create_receiver(backend: str, *args: Any, **kwargs: Any) -> ReceiverBase:
    """A receiver of the named backend (arguments as ``ReceiverBase``); call ``start()``."""
    return _classes(backend)[1](*args, **kwargs)
