"""One request on a sender session: ``PeerStream`` (``send(part)`` per layer, ``finish()``,
``wait()``, ``abort()``) and ``QueuedFrame``, a frame queued on one connection.

``send`` checks a part against the announced header, starts the GPU -> pinned host copy of CUDA
tensors (the session's dispatcher waits for it) and queues; it never waits on the network. The
stream's ``stats`` (``SendStats``) count bytes as the I/O thread hands them to the kernel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prfaas.kv.layout import DTYPES
from prfaas.kv.unit import LayerPart
from prfaas.transfer import wire
from prfaas.transfer.backend import SenderStream, SendStats
from prfaas.transfer.errors import TransferError, error_from_code

if TYPE_CHECKING:
    from prfaas.transfer.sender_session import PeerSession

FINISH = object()  # queued after a stream's last layer: all of it was dispatched


@dataclass
class QueuedFrame:
    """A frame queued on one connection: its buffers (views), when it may be written, for whom."""

    buffers: list[memoryview]
    nbytes: int
    stream: PeerStream | None
    kind: str  # header | data | commit | abort
    payload: int
    due: float | None  # monotonic time its last byte may have crossed the shaped link
    keep: Any = field(default=None, repr=False)  # keeps the source memory alive
    # run by the I/O thread right before the frame's first byte is written (e.g. hash the slice
    # and fill in its sub-header); False: not ready yet (``blocked`` says whether it would be)
    prepare: Callable[[QueuedFrame], bool] | None = field(default=None, repr=False)
    blocked: Callable[[], bool] | None = field(default=None, repr=False)
    started: bool = False
    left: int = -1  # bytes not yet written (set from nbytes)

    def __post_init__(self) -> None:
        self.left = self.nbytes


class PeerStream(SenderStream):
    """One request on a ``PeerSession``: ``send(part)`` per layer, ``finish()``, ``wait()``."""

    def __init__(self, session: PeerSession, wh: wire.WireHeader) -> None:
        self.session = session
        self.wire_header = wh
        self.stream_id = wh.stream_id
        self.request_id = wh.header.request_id
        self.stats = SendStats(self.request_id, opened_at=time.time())
        self._sent: set[int] = set()
        self._finished = False
        self._dispatched = False
        self._pending = 0
        self._last_sent = self.stats.opened_at
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._all_sent = threading.Event()
        self.error: TransferError | None = None
        self.buffer: dict | None = None  # mooncake: where to write
        self._staging: list[torch.Tensor] = []  # pinned host copies of GPU parts
        self.buffer_ready = threading.Event()

    # --- compute-thread API
    def send(self, part: LayerPart) -> None:
        """Queue one layer's cache (checked against the header); returns without network I/O.

        The tensors must not be modified until the stream is done. Parts of a stream the
        receiver already refused are dropped; ``wait()`` raises the reason.
        """
        desc = self._check_part(part)
        if self._done.is_set():  # refused/failed already: drop; wait() reports why
            self._sent.add(part.layer)
            return
        tensors, event = [], None
        for d in desc.tensors:
            t = part.tensors[d.name].detach()
            if t.is_cuda:  # GPU -> pinned host, asynchronously; the dispatcher waits on the event
                n = t.numel() * t.element_size()
                staging = self.session.owner._take_pinned(n)
                self._staging.append(staging)
                host = staging[:n].view(t.dtype).view(t.shape)
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(t.device))  # the stream the copy ran on
                t = host
            elif not t.is_contiguous():
                t = t.contiguous()
            tensors.append(t)
        self._sent.add(part.layer)
        nbytes = part.nbytes()
        self.session.meter.add_queued(nbytes)  # in flight from now on, for the scheduler
        self.session.submit(self, (part.layer, tensors, event, nbytes))

    def finish(self) -> None:
        """All layers given: the receiver will deliver once they are in."""
        if self._finished:
            raise ValueError(f"stream {self.request_id!r} already finished")
        missing = sorted(set(range(len(self.wire_header.layers))) - self._sent)
        if missing:
            raise ValueError(f"finish() before all layers were sent; missing {missing}")
        self._finished = True
        self.stats.finished_at = time.time()
        self.session.submit(self, FINISH)

    def abort(self, reason: str = "aborted by sender") -> None:
        """Give up on this request; the receiver frees its buffers."""
        if self._done.is_set():
            return
        payload = wire.error_payload("aborted", reason, self.stream_id)
        self.session.enqueue(0, [wire.frame(wire.ABORT, payload)], self, "abort", 0)
        self._complete(error_from_code("aborted", reason))

    def wait(self, timeout: float | None = None) -> SendStats:
        """Block until the receiver acknowledged delivery; raises the TransferError otherwise."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} not acknowledged in {timeout} s")
        if self.error is not None:
            raise self.error
        self._all_sent.wait(5.0)  # the ack may overtake the I/O thread's bookkeeping
        return self.stats

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # --- internals
    def _check_part(self, part: LayerPart) -> wire.LayerDesc:
        layers = self.wire_header.layers
        if self._finished:
            raise ValueError("send() after finish()")
        if not 0 <= part.layer < len(layers):
            raise ValueError(f"layer {part.layer} out of range [0, {len(layers)})")
        if part.layer in self._sent:
            raise ValueError(f"layer {part.layer} already sent")
        desc = layers[part.layer]
        if part.kind != desc.kind:
            raise ValueError(f"layer {part.layer} is {desc.kind}, part says {part.kind}")
        if sorted(part.tensors) != sorted(t.name for t in desc.tensors):
            raise ValueError(
                f"layer {part.layer} tensors {sorted(part.tensors)} != "
                f"{sorted(t.name for t in desc.tensors)}"
            )
        for d in desc.tensors:
            t = part.tensors[d.name]
            if t.dtype != DTYPES[d.dtype] or tuple(t.shape) != d.shape:
                raise ValueError(
                    f"layer {part.layer} {d.name}: got {t.dtype} {tuple(t.shape)}, "
                    f"header says {d.dtype} {d.shape}"
                )
        return desc

    def _add_pending(self, n: int) -> None:
        with self._lock:
            self._pending += n

    def _on_sent(self, kind: str, nbytes: int, payload: int, at: float | None = None) -> None:
        with self._lock:
            s = self.stats
            if kind == "header":
                s.header_bytes += nbytes
            elif kind == "data":
                s.payload_bytes += payload
                s.framing_bytes += nbytes - payload
                s.data_frames += 1
            elif kind == "commit":
                s.framing_bytes += nbytes
                s.commit_frames += 1
            self._pending -= 1
            if at is not None:  # when the bytes were handed to the kernel
                self._last_sent = max(self._last_sent, at)
            self._check_all_sent()

    def _mark_dispatched(self) -> None:
        with self._lock:
            self._dispatched = True
            self._check_all_sent()

    def _check_all_sent(self) -> None:
        if self._dispatched and self._pending == 0:
            if self.stats.last_byte_sent_at is None:
                self.stats.last_byte_sent_at = self._last_sent
            self._all_sent.set()

    def _complete(self, error: TransferError | None) -> None:
        if self._done.is_set():
            return
        self.error = error
        if error is None:
            with self._lock:  # an ack implies every byte left, even if FINISH is still queued
                if self.stats.last_byte_sent_at is None:
                    self.stats.last_byte_sent_at = self._last_sent
            self.stats.acked_at = time.time()
        self.buffer_ready.set()
        self._done.set()
        self.session.forget(self.stream_id)
        staging, self._staging = self._staging, []
        for buf in staging:
            self.session.owner._give_pinned(buf)
