"""Sender side shared by the backends.

A ``SenderBase`` keeps one ``PeerSession`` per receiver: N authenticated connections (N sized to the
link, ``connections_for_link``), one dispatcher thread (waits for GPU copies, slices layers, computes
layer checksums) and one event-driven I/O thread that writes every connection (non-blocking
``sendmsg`` of memoryviews straight from the tensors' storage: no joining copies) and reads the
receiver's replies. ``stream.send`` only queues and never waits on the network. With a shaped link
(``LinkShaperSpec``) every frame is booked on the link when it is queued and written when its last
byte may have crossed it.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
MAX_CONNECTIONS = 16
_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
_GATHER_BYTES = 8 << 20  # frames gathered into one sendmsg (more than a socket buffer holds)
_WRITE_BURST = 64 << 20  # bytes written to one connection before the loop looks at the others


def tcp_window_bytes() -> int:
    """The largest send window the kernel grants one connection (``tcp_wmem`` max), else 4 MiB."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


def connections_for_link(gbps: float | None, rtt_ms: float | None, window: int = 0) -> int:
    """Connections needed to keep ``gbps`` in flight over ``rtt_ms`` when one connection's window
    is ``window`` bytes: ceil(bandwidth-delay product / window), in [1, MAX_CONNECTIONS]. An
    unknown rate is taken as 100 Gbps; an unknown RTT as 1 ms."""
    window = window or tcp_window_bytes()
    bdp = (gbps or 100.0) * 1e9 / 8 * (rtt_ms if rtt_ms is not None else 1.0) / 1e3
    return max(1, min(MAX_CONNECTIONS, math.ceil(bdp / window)))


@dataclass
class _Out:
    """A frame queued on one connection: its buffers (views), when it may be written, for whom."""

    buffers: list[memoryview]
    nbytes: int
    stream: PeerStream | None
    kind: str  # header | data | commit | abort
    payload: int
    due: float | None  # monotonic time its last byte may have crossed the shaped link
    started: bool = False
    keep: Any = field(default=None, repr=False)  # keeps the source memory alive


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


class PeerSession:
    """N authenticated connections to one receiver, served by one I/O thread and one dispatcher
    thread; its link shaper (if any) and meter."""

    def __init__(self, owner: SenderBase, peer: Peer) -> None:
        self.owner = owner
        self.peer = peer
        self.session_id = os.urandom(16)
        self.link: LinkShaper | None = owner.link_spec.build() if owner.link_spec else None
        self.meter = LinkMeter(link=self.link)
        self.socks: list[socket.socket] = []
        self.error: TransferError | None = None
        self.streams: dict[int, PeerStream] = {}
        self.last_used = time.monotonic()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._closing = False
        try:
            t0 = time.perf_counter()
            first = socket.create_connection(peer, timeout=owner.connect_timeout)
            self.socks.append(first)
            self.connect_rtt_ms = (time.perf_counter() - t0) * 1e3  # SYN -> SYN-ACK
            n_conns = owner._n_conns(self.connect_rtt_ms)
            self.socks.clear()
            for i in range(n_conns):
                s = first if i == 0 else socket.create_connection(peer, owner.connect_timeout)
                wire.tune_socket(s)
                self.socks.append(s)
                client_handshake(s, owner.secret, owner.backend_code, self.session_id, i, n_conns)
                s.setblocking(False)
                self.meter.attach(s)
        except BaseException:
            for s in self.socks:
                s.close()
            raise
        self.out: list[collections.deque[_Out]] = [collections.deque() for _ in self.socks]
        self.dispatch_q: queue.SimpleQueue = queue.SimpleQueue()
        self._rr = itertools.cycle(range(len(self.socks)))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tseq = itertools.count()
        self._rbuf = bytearray()
        self.threads = [
            threading.Thread(target=self._io_loop, daemon=True, name="tx-io"),
            threading.Thread(target=self._dispatch_loop, daemon=True, name="tx-dispatch"),
        ]
        for t in self.threads:
            t.start()

    # --- API used by streams / backends
    def open(self, header: TransferHeader, parts: list[LayerPart] | None) -> PeerStream:
        if self.error is not None:
            raise self.error
        self.last_used = time.monotonic()
        wh = wire.build_wire_header(header, self.owner.layout, 0, parts, self.owner.slice_bytes)
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

    def forget(self, stream_id: int) -> None:
        with self._lock:
            self.streams.pop(stream_id, None)

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
        keep: Any = None,
    ) -> None:
        """Queue a frame on connection ``conn``; ``shaped=False``: delay only, no bandwidth."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        nbytes = sum(len(v) for v in views)
        if stream is not None:
            stream._add_pending(1)
        self.meter.add_queued(nbytes)
        # the link is booked in queueing order, so slow writes never stretch its timeline
        due = None
        if self.link is not None:
            due = self.link.reserve(nbytes) if shaped else time.monotonic() + self.link.one_way_s
        self.out[conn].append(_Out(views, nbytes, stream, kind, payload, due, keep=keep))
        self.wake()

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def next_conn(self) -> int:
        return next(self._rr)

    def snapshot(self) -> LinkSnapshot:
        return self.meter.snapshot()

    def fail(self, error: TransferError) -> None:
        """The session is unusable: fail every open stream and drop the connections."""
        with self._lock:
            if self.error is None:
                self.error = error
            streams = list(self.streams.values())
            self.streams.clear()
        for st in streams:
            st._complete(error)
        self._closing = True
        self.wake()
        self.dispatch_q.put(None)

    def close(self) -> None:
        self._closing = True
        self.wake()
        self.dispatch_q.put(None)
        for t in self.threads:
            if t is not threading.current_thread():
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

    # --- the I/O thread
    def _io_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, -1)
        sel.register(self.socks[0], selectors.EVENT_READ, 0)  # the receiver's replies
        writing: set[int] = set()  # connections waiting for room in their socket buffer
        try:
            while not self._closing:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    heapq.heappop(self._timers)[2]()
                for i, q in enumerate(self.out):
                    if i in writing or not q or (q[0].due is not None and q[0].due > now):
                        continue
                    if not self._write(i):  # socket full: wait until writable
                        writing.add(i)
                        self._interest(sel, i, writing)
                next_at = self._timers[0][0] if self._timers else None
                for i, q in enumerate(self.out):  # the next frame to come due (shaped link)
                    if i in writing or not q:
                        continue
                    due = now if q[0].started or q[0].due is None else q[0].due
                    next_at = due if next_at is None else min(next_at, due)
                timeout = None if next_at is None else max(0.0, next_at - time.monotonic())
                for key, mask in sel.select(timeout):
                    i = key.data
                    if i == -1:
                        with contextlib.suppress(BlockingIOError, OSError):
                            while self._wake_r.recv(4096):
                                pass
                        self._woken = False  # after draining: a wake-up since then is seen
                        continue
                    if mask & selectors.EVENT_READ and i == 0:
                        self._read_replies()
                    if mask & selectors.EVENT_WRITE and i in writing:
                        writing.discard(i)
                        self._interest(sel, i, writing)
        except TransferError as e:
            if not self._closing:
                self.fail(e)
        except OSError as e:
            if not self._closing:
                self.fail(PeerClosed(f"connection lost: {e}"))
        finally:
            sel.close()
            self._drop_queued()
            self._shutdown()

    def _interest(self, sel: selectors.BaseSelector, i: int, writing: set[int]) -> None:
        ev = selectors.EVENT_WRITE if i in writing else 0
        if i == 0:
            sel.modify(self.socks[0], selectors.EVENT_READ | ev, 0)
        elif ev:
            sel.register(self.socks[i], ev, i)
        else:
            sel.unregister(self.socks[i])

    def _write(self, i: int) -> bool:
        """Write connection ``i``'s due frames until its socket is full (False) or none is due."""
        sock, q = self.socks[i], self.out[i]
        budget = _WRITE_BURST
        while q and budget > 0:
            item = q[0]
            now = time.monotonic()
            if not item.started:
                if item.due is not None and item.due > now:
                    return True
                if self._dropped(item):
                    q.popleft()
                    self.meter.add_queued(-item.nbytes)
                    if item.stream is not None:
                        item.stream._on_sent("dropped", 0, 0)
                    continue
                item.started = True
            # gather the head frame and the due frames behind it into one sendmsg
            bufs: list[memoryview] = []
            gathered = 0
            for it in itertools.islice(q, 0, 64):
                if not it.started:
                    if (it.due is not None and it.due > now) or self._dropped(it):
                        break
                    it.started = True
                bufs.extend(it.buffers)
                gathered += it.nbytes
                if len(bufs) >= _IOV_MAX or gathered >= _GATHER_BYTES:
                    break
            try:
                n = sock.sendmsg(bufs[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                raise PeerClosed(f"send failed: {e}") from e
            budget -= n
            at = time.time()
            while n:
                head = q[0]
                b0 = head.buffers[0]
                if n >= len(b0):
                    n -= len(b0)
                    head.buffers.pop(0)
                else:
                    head.buffers[0] = b0[n:]
                    n = 0
                if not head.buffers:
                    self._sent(q.popleft(), at)
            while q and not q[0].buffers:  # zero-length frames
                self._sent(q.popleft(), at)
        return True

    def _dropped(self, item: _Out) -> bool:
        """Whether a frame not yet begun is to be dropped (its stream ended, or the session)."""
        st = item.stream
        if self.error is not None:
            return True
        if item.kind == "abort":  # the header never left: the receiver has nothing to free
            return st is not None and st.stats.header_bytes == 0
        return st is not None and st.done

    def _sent(self, item: _Out, at: float) -> None:
        self.meter.add_sent(item.nbytes, item.nbytes)
        if item.stream is not None:
            item.stream._on_sent(item.kind, item.nbytes, item.payload, at)

    def _drop_queued(self) -> None:
        for q in self.out:
            while q:
                item = q.popleft()
                self.meter.add_queued(-item.nbytes)
                if item.stream is not None:
                    item.stream._on_sent("dropped", 0, 0)

    def _read_replies(self) -> None:
        """Read what the receiver sent on connection 0 (non-blocking) and act on whole frames."""
        sock = self.socks[0]
        while True:
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise PeerClosed(f"connection lost: {e}") from e
            if not chunk:
                raise PeerClosed("receiver closed the connection")
            self._rbuf += chunk
        head = wire.FRAME_HEAD.size
        while len(self._rbuf) >= head:
            ftype, size = wire.parse_frame_head(
                bytes(self._rbuf[:head]), {wire.DONE, wire.BUFFER, wire.ERROR}
            )
            if len(self._rbuf) < head + size:
                break
            payload = bytes(self._rbuf[head : head + size])
            del self._rbuf[: head + size]
            if self.link is not None:  # the way back takes RTT/2 too (unshaped: tiny frames)
                at = time.monotonic() + self.link.one_way_s
                heapq.heappush(
                    self._timers,
                    (at, next(self._tseq), lambda f=ftype, p=payload: self._reply(f, p)),
                )
            else:
                self._reply(ftype, payload)

    def _reply(self, ftype: int, payload: bytes) -> None:
        o = wire.parse_json_payload(payload, wire.FRAME_NAMES[ftype])
        sid = o.get("stream_id")
        with self._lock:
            stream = self.streams.get(sid) if isinstance(sid, int) else None
        if ftype == wire.ERROR and stream is None:
            raise error_from_code(str(o.get("code")), f"receiver: {o.get('message')}")
        if stream is None:
            return
        if ftype == wire.BUFFER:
            stream.buffer = o
            stream.buffer_ready.set()
            return
        self.forget(sid)
        if o.get("ok"):
            stream._complete(None)
        else:
            msg = f"receiver refused {stream.request_id!r}: {o.get('message')}"
            stream._complete(error_from_code(str(o.get("code")), msg))

    # --- the dispatcher thread
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
                self.meter.add_queued(-nbytes)
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
                self.meter.add_queued(-nbytes)


class SenderBase(Sender):
    """Opens streams to receivers; one ``PeerSession`` per peer, created on first use.

    ``link`` emulates a cross-cluster link for every peer of this sender (None: unshaped).
    ``connections`` None sizes the connection count to the link (``connections_for_link``: the
    shaped link's rate and RTT, else the RTT measured on the first connection and 100 Gbps).
    A session idle for ``idle_close_s`` is closed and reopened on next use (receivers close idle
    connections after a longer time).
    """

    backend_code = 0

    def __init__(
        self,
        layout: CacheLayout,
        secret: bytes | str,
        *,
        connections: int | None = None,
        link: LinkShaperSpec | None = None,
        slice_bytes: int | None = None,
        connect_timeout: float = 10.0,
        idle_close_s: float = 120.0,
    ) -> None:
        if connections is not None and not 1 <= connections <= 64:
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
        self.idle_close_s = idle_close_s
        self._sessions: dict[Peer, PeerSession] = {}
        self._pinned: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _n_conns(self, connect_rtt_ms: float) -> int:
        """Connections per peer: as configured, else sized to the link (the shaped link's top
        rate and RTT plus the measured connect RTT; unshaped: 100 Gbps over the measured RTT)."""
        if self.connections is not None:
            return self.connections
        spec = self.link_spec
        if spec is not None:
            rate = max([g for _, g in spec.schedule] or [spec.gbps or 0.0]) or None
            return connections_for_link(rate, spec.rtt_ms + connect_rtt_ms)
        return connections_for_link(None, connect_rtt_ms)

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
        stale = None
        with self._lock:
            s = self._sessions.get(peer)
            idle = s is not None and time.monotonic() - s.last_used > self.idle_close_s
            if idle and s is not None and s.error is None and not s.streams:
                stale, s = s, None
            if s is None or s.error is not None:
                s = PeerSession(self, peer)
                self._sessions[peer] = s
        if stale is not None:
            stale.close()
        return s

    def open(self, peer: Peer, header: TransferHeader) -> PeerStream:
        """Announce a request to ``peer``; send its layers with ``stream.send`` as they are computed."""
        return self.session(peer).open(header, None)

    def send_export(
        self, peer: Peer, export: KVExport, header_checksums: bool = False
    ) -> PeerStream:
        """Send a complete export; returns the stream. With ``header_checksums`` the layer
        checksums are computed up front (on the caller's thread), put in the header and reused
        for the COMMIT frames."""
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
