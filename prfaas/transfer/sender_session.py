"""One sender's link to one receiver: ``PeerSession``.

N authenticated connections (N sized to the link by the ``SenderBase``), one dispatcher thread
(waits for GPU copies, hands each layer to the backend's ``_dispatch_layer``, which slices it and
computes checksums) and one event-driven I/O thread that writes every connection (non-blocking
``sendmsg`` of memoryviews straight from the tensors' storage: no joining copies) and reads the
receiver's replies on connection 0. With a shaped link (``LinkShaperSpec``) every frame is booked on
the link when it is queued and written when its last byte may have crossed it.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prfaas.kv.unit import LayerPart, TransferHeader
from prfaas.transfer import wire
from prfaas.transfer.auth import client_handshake
from prfaas.transfer.backend import Peer
from prfaas.transfer.errors import PeerClosed, TransferError, error_from_code
from prfaas.transfer.link import LinkShaper
from prfaas.transfer.meter import LinkMeter, LinkSnapshot
from prfaas.transfer.sender_stream import FINISH, PeerStream, QueuedFrame

if TYPE_CHECKING:
    from prfaas.transfer.sender import SenderBase

_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
_GATHER_BYTES = 8 << 20  # frames gathered into one sendmsg (more than a socket buffer holds)
_GATHER_PREPARED = 256 << 10  # frames up to this size are prepared and gathered behind the head
_WRITE_BURST = 64 << 20  # bytes written to one connection before the loop looks at the others


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
        self.out: list[collections.deque[QueuedFrame]] = [collections.deque() for _ in self.socks]
        self.dispatch_q: queue.SimpleQueue = queue.SimpleQueue()
        self._rr = itertools.cycle(range(len(self.socks)))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._sleeping = False  # the I/O thread is (about to be) waiting in select
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
        prepare: Callable[[QueuedFrame], bool] | None = None,
        blocked: Callable[[], bool] | None = None,
    ) -> None:
        """Queue a frame on connection ``conn``; ``shaped=False``: delay only, no bandwidth.

        ``prepare(item)`` runs on the I/O thread right before the frame's first byte is written
        and may replace its buffers (same total size); while ``blocked()`` is true the frame
        and everything behind it on ``conn`` wait (it must turn false through this thread's own
        writes on other connections)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        nbytes = sum(len(v) for v in views)
        if stream is not None:
            stream._add_pending(1)
        self.meter.add_queued(nbytes)
        # the link is booked in queueing order, so slow writes never stretch its timeline
        due = None
        if self.link is not None:
            due = self.link.reserve(nbytes) if shaped else time.monotonic() + self.link.one_way_s
        q = self.out[conn]
        q.append(QueuedFrame(views, nbytes, stream, kind, payload, due, keep, prepare, blocked))
        # a frame behind others is written when they are (or when the socket has room again):
        # the I/O thread needs a wake-up (a syscall, and a cross-CPU interrupt here) only when
        # this frame is the queue's head and the thread may be waiting in select
        if self._sleeping and len(q) == 1:
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
                # set before looking at the queues for the last time: a frame queued after this
                # look wakes the thread (``enqueue``), one queued before it is seen here
                self._sleeping = True
                next_at = self._timers[0][0] if self._timers else None
                for i, q in enumerate(self.out):  # the next frame to come due (shaped link)
                    if i in writing or not q or self._blocked(q[0]):
                        continue
                    due = now if q[0].started or q[0].due is None else q[0].due
                    next_at = due if next_at is None else min(next_at, due)
                timeout = None if next_at is None else max(0.0, next_at - time.monotonic())
                events = sel.select(timeout)
                self._sleeping = False
                for key, mask in events:
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
            if not item.started:
                if item.due is not None and item.due > time.monotonic():
                    return True
                if self._dropped(item):
                    q.popleft()
                    self.meter.add_queued(-item.nbytes)
                    if item.stream is not None:
                        item.stream._on_sent("dropped", 0, 0)
                    continue
                if not self._start(item):
                    return True  # waits on another connection's frames
            # the head frame alone while much of it is left (the socket fills before its end);
            # its tail is gathered with the due frames behind it into one sendmsg
            bufs = item.buffers
            if item.left < _GATHER_PREPARED and len(q) > 1:
                bufs = self._gather(q)
            try:
                n = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                raise PeerClosed(f"send failed: {e}") from e
            budget -= n
            at = None
            while n:
                head = q[0]
                hb = head.buffers
                b0 = hb[0]
                if n < len(b0):
                    hb[0] = b0[n:]
                    head.left -= n
                    break
                n -= len(b0)
                head.left -= len(b0)
                del hb[0]
                if not hb:
                    q.popleft()
                    if at is None:
                        at = time.time()
                    self._sent(head, at)
            while q and not q[0].buffers:  # zero-length frames
                self._sent(q.popleft(), time.time())
        return True

    def _gather(self, q: collections.deque[QueuedFrame]) -> list[memoryview]:
        """The started head's buffers and those of the due frames behind it, for one sendmsg.

        A big frame that must be prepared (a slice hashed) waits to be the head, so its bytes
        are still in cache when the kernel copies them; small ones (COMMITs, small slices) join.
        """
        bufs: list[memoryview] = []
        gathered = 0
        now = time.monotonic() if self.link is not None else 0.0
        # by index, never through an iterator: other threads append to the deque meanwhile (a
        # GIL switch can fall between any two bytecodes, even between making an iterator and
        # reading it: the snapshot ``list(islice(q))`` used before once raised "deque mutated
        # during iteration" here and the I/O thread died); only this thread pops from the left,
        # so the first items keep their indices
        for k in range(min(len(q), 64)):
            it = q[k]
            if not it.started:
                if (it.due is not None and it.due > now) or self._dropped(it):
                    break
                if it.prepare is not None and it.nbytes > _GATHER_PREPARED:
                    break
                if not self._start(it):
                    break
            bufs.extend(it.buffers)
            gathered += it.left
            if len(bufs) >= _IOV_MAX or gathered >= _GATHER_BYTES:
                break
        return bufs[:_IOV_MAX]

    @staticmethod
    def _blocked(item: QueuedFrame) -> bool:
        return not item.started and item.blocked is not None and item.blocked()

    @staticmethod
    def _start(item: QueuedFrame) -> bool:
        """Prepare a frame about to be written; False if it must wait."""
        if item.prepare is not None and not item.prepare(item):
            return False
        item.started = True
        return True

    def _dropped(self, item: QueuedFrame) -> bool:
        """Whether a frame not yet begun is to be dropped (its stream ended, or the session)."""
        st = item.stream
        if self.error is not None:
            return True
        if item.kind == "abort":  # the header never left: the receiver has nothing to free
            return st is not None and st.stats.header_bytes == 0
        return st is not None and st.done

    def _sent(self, item: QueuedFrame, at: float) -> None:
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
                chunk = sock.recv(65536, socket.MSG_DONTWAIT)
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
            if work is FINISH:
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
