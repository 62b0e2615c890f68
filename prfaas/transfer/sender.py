"""Sender side shared by the backends: peer sessions of N authenticated connections, a dispatcher
thread per peer (checksums, slicing) and one sending thread per connection, so ``stream.send`` only
queues and never waits on the network."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import threading
import time
from typing import Any

import torch

from prfaas.kv.layout import DTYPES, CacheLayout
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader
from prfaas.transfer import wire
from prfaas.transfer.auth import check_secret, client_handshake
from prfaas.transfer.backend import Peer, Sender, SenderStream, SendStats
from prfaas.transfer.errors import PeerClosed, TransferError, error_from_code
from prfaas.transfer.link import LinkShaper, LinkShaperSpec
from prfaas.transfer.meter import LinkMeter, LinkSnapshot

_FINISH = object()


class PeerStream(SenderStream):
    """One request being sent: ``send(part)`` per layer, then ``finish()``; ``wait()`` for the ack."""

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
        self.session.monitor.add_queued(nbytes)  # in flight from now on, for the scheduler
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
        self.session.submit(self, _FINISH)

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
        self._all_sent.wait(5.0)  # the ack may overtake the sending threads' bookkeeping
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
        with self.session._lock:
            self.session.streams.pop(self.stream_id, None)
        staging, self._staging = self._staging, []
        for buf in staging:
            self.session.owner._give_pinned(buf)


class PeerSession:
    """N authenticated connections to one receiver, their threads, link emulator and monitor."""

    def __init__(self, owner: SenderBase, peer: Peer, n_conns: int) -> None:
        self.owner = owner
        self.peer = peer
        self.session_id = os.urandom(16)
        self.link: LinkShaper | None = owner.link_spec.build() if owner.link_spec else None
        self.monitor = LinkMeter(link=self.link)
        self.socks: list[socket.socket] = []
        self.error: TransferError | None = None
        self.streams: dict[int, PeerStream] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._closing = False
        try:
            for i in range(n_conns):
                s = socket.create_connection(peer, timeout=owner.connect_timeout)
                wire.tune_socket(s)
                self.socks.append(s)
                client_handshake(s, owner.secret, owner.backend_code, self.session_id, i, n_conns)
                s.settimeout(None)
                self.monitor.attach(s)
        except BaseException:
            for s in self.socks:
                s.close()
            raise
        self.queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in self.socks]
        self.dispatch_q: queue.SimpleQueue = queue.SimpleQueue()
        self._rr = itertools.cycle(range(len(self.socks)))
        self.threads = [
            threading.Thread(target=self._send_loop, args=(i,), daemon=True, name=f"tx{i}")
            for i in range(len(self.socks))
        ]
        self.threads.append(threading.Thread(target=self._control_loop, daemon=True, name="txc"))
        self.threads.append(threading.Thread(target=self._dispatch_loop, daemon=True, name="txd"))
        for t in self.threads:
            t.start()

    # --- API used by streams / backends
    def open(self, header: TransferHeader, parts: list[LayerPart] | None) -> PeerStream:
        if self.error is not None:
            raise self.error
        wh = wire.build_wire_header(header, self.owner.layout, 0, parts)
        # stream ids must reach the receiver in increasing order: allocating the id and queueing
        # the header happen under one lock, so concurrent opens cannot overtake each other
        with self._open_lock:
            wh.stream_id = next(self._ids)
            payload = wire.encode_header(wh)
            stream = PeerStream(self, wh)
            with self._lock:
                self.streams[stream.stream_id] = stream
            self.enqueue(0, [wire.frame(wire.HEADER, payload)], stream, "header", 0)
        return stream

    def submit(self, stream: PeerStream, item: Any) -> None:
        self.dispatch_q.put((stream, item))

    def enqueue(
        self,
        conn: int,
        buffers: list,
        stream: PeerStream | None,
        kind: str,
        payload: int,
        shaped: bool = True,
    ) -> None:
        """Queue a frame on connection ``conn``; ``shaped=False``: delay only, no bandwidth."""
        nbytes = sum(len(b) for b in buffers)
        if stream is not None:
            stream._add_pending(1)
        self.monitor.add_queued(nbytes)
        # the link is booked in dispatch order, so slow writes never stretch its timeline
        due = None
        if self.link is not None:
            due = self.link.reserve(nbytes) if shaped else time.monotonic() + self.link.one_way_s
        self.queues[conn].put((buffers, nbytes, stream, kind, payload, due))

    def next_conn(self) -> int:
        return next(self._rr)

    def snapshot(self) -> LinkSnapshot:
        return self.monitor.snapshot()

    def fail(self, error: TransferError) -> None:
        """The session is unusable: fail every open stream and drop the connections."""
        with self._lock:
            if self.error is None:
                self.error = error
            streams = list(self.streams.values())
            self.streams.clear()
        for st in streams:
            st._complete(error)
        self._shutdown()

    def close(self) -> None:
        self._closing = True
        for q in self.queues:
            q.put(None)
        self.dispatch_q.put(None)
        for t in self.threads[: len(self.socks)]:
            t.join(timeout=5)
        bulk = getattr(self, "bulk", None)
        if bulk is not None:
            bulk.shutdown(wait=True, cancel_futures=True)
        self._shutdown()
        with self._lock:
            streams = list(self.streams.values())
        for st in streams:
            st._complete(PeerClosed("sender closed"))

    def _shutdown(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    # --- threads
    def _send_loop(self, i: int) -> None:
        sock, q = self.socks[i], self.queues[i]
        while True:
            item = q.get()
            if item is None:
                return
            buffers, nbytes, stream, kind, payload, due = item
            dropped = stream is not None and stream.done and kind != "abort"
            if kind == "abort" and stream is not None and stream.stats.header_bytes == 0:
                dropped = True  # the header never left: the receiver has nothing to free
            if self.error is not None or dropped:
                self.monitor.add_queued(-nbytes)
                if stream is not None:
                    stream._on_sent("dropped", 0, 0)
                continue
            try:
                if due is not None:
                    self.link.wait_until(due)  # type: ignore[union-attr]
                at = time.time()
                n = wire.send_buffers(sock, buffers)
            except TransferError as e:
                self.monitor.add_queued(-nbytes)
                self.fail(e)
                continue
            self.monitor.add_sent(n, nbytes)
            if stream is not None:
                stream._on_sent(kind, n, payload, at)

    def _control_loop(self) -> None:
        sock = self.socks[0]
        try:
            while True:
                ftype, payload = wire.read_small_frame(sock, {wire.DONE, wire.BUFFER, wire.ERROR})
                if self.link is not None:  # the way back takes RTT/2 too (unshaped: tiny frames)
                    self.link.wait_until(time.monotonic() + self.link.one_way_s)
                o = wire.parse_json_payload(payload, wire.FRAME_NAMES[ftype])
                sid = o.get("stream_id")
                with self._lock:
                    stream = self.streams.get(sid) if isinstance(sid, int) else None
                if ftype == wire.ERROR and stream is None:
                    raise error_from_code(str(o.get("code")), f"receiver: {o.get('message')}")
                if stream is None:
                    continue
                if ftype == wire.BUFFER:
                    stream.buffer = o
                    stream.buffer_ready.set()
                    continue
                with self._lock:
                    self.streams.pop(sid, None)
                if o.get("ok"):
                    stream._complete(None)
                else:
                    msg = f"receiver refused {stream.request_id!r}: {o.get('message')}"
                    stream._complete(error_from_code(str(o.get("code")), msg))
        except TransferError as e:
            if not self._closing:
                self.fail(e)

    def _dispatch_loop(self) -> None:
        while True:
            item = self.dispatch_q.get()
            if item is None:
                return
            stream, work = item
            if work is _FINISH:
                stream._mark_dispatched()
                continue
            layer, tensors, event, nbytes = work
            if stream.done:
                self.monitor.add_queued(-nbytes)
                continue
            if event is not None:
                event.synchronize()
            try:
                self.owner._dispatch_layer(self, stream, layer, tensors)
            except TransferError as e:
                # the receiver's verdict (e.g. a checksum failure that freed the buffer we were
                # writing into) usually explains a backend error: give it a moment to arrive
                if not stream._done.wait(1.0):
                    stream.abort(str(e))
            finally:  # its slices are counted where they were queued now
                self.monitor.add_queued(-nbytes)


class SenderBase(Sender):
    """Opens streams to receivers; one ``PeerSession`` per peer, created on first use.

    ``link`` emulates a cross-cluster link for every peer of this sender (None: unshaped).
    """

    backend_code = 0

    def __init__(
        self,
        layout: CacheLayout,
        secret: bytes | str,
        *,
        connections: int = 4,
        link: LinkShaperSpec | None = None,
        slice_bytes: int | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be in [1, 64], got {connections}")
        if slice_bytes is None:  # big slices are cheaper; small ones keep a shaped link smooth
            slice_bytes = 1 << 20 if link is not None else 4 << 20
        if not 4096 <= slice_bytes <= wire.MAX_SLICE_BYTES:
            raise ValueError(f"slice_bytes must be in [4096, {wire.MAX_SLICE_BYTES}]")
        self.layout = layout
        self.secret = check_secret(secret)
        self.connections = connections
        self.link_spec = link
        self.slice_bytes = slice_bytes
        self.connect_timeout = connect_timeout
        self._sessions: dict[Peer, PeerSession] = {}
        self._pinned: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _n_conns(self) -> int:
        return self.connections

    def _take_pinned(self, nbytes: int) -> torch.Tensor:
        """A pinned host staging buffer of at least ``nbytes`` (reused: pinning is slow)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._pinned) if nbytes <= b.numel() <= 2 * nbytes]
            if fits:  # by index: list.remove would compare tensors elementwise
                return self._pinned.pop(min(fits, key=lambda i: self._pinned[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def _give_pinned(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._pinned.append(buf)

    def session(self, peer: Peer) -> PeerSession:
        """The (re)connected session to ``peer``; AuthError if the peer fails authentication."""
        peer = (peer[0], int(peer[1]))
        with self._lock:
            s = self._sessions.get(peer)
            if s is None or s.error is not None:
                s = PeerSession(self, peer, self._n_conns())
                self._sessions[peer] = s
            return s

    def open(self, peer: Peer, header: TransferHeader) -> PeerStream:
        """Announce a request to ``peer``; send its layers with ``stream.send`` as they are computed."""
        return self.session(peer).open(header, None)

    def send_export(
        self, peer: Peer, export: KVExport, header_checksums: bool = False
    ) -> PeerStream:
        """Send a complete export; returns the stream. With ``header_checksums`` the layer CRCs
        are computed up front (on the caller's thread) and put in the header as well."""
        parts = export.parts if header_checksums else None
        stream = self.session(peer).open(export.header, parts)
        for part in export.parts:
            stream.send(part)
        stream.finish()
        return stream

    def snapshot(self, peer: Peer) -> LinkSnapshot:
        """Live link figures for ``peer`` (connects if needed)."""
        return self.session(peer).snapshot()

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()

    def __enter__(self) -> SenderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dispatch_layer(
        self, session: PeerSession, stream: PeerStream, layer: int, tensors: list[torch.Tensor]
    ) -> None:
        raise NotImplementedError
