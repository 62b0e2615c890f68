"""Receiver side shared by the backends.

One event-driven I/O thread (``selectors``) accepts connections, runs the HMAC handshake as a state
machine, groups authenticated connections into sender sessions, validates each announced request
against the ``CacheLayout`` before allocating its buffer, and reads layer bytes straight into that
buffer (``recv_into`` of a view of the destination: no intermediate copies), hashing each piece
while it is still in cache (XXH3-64, checked per slice). Only complete, verified exports are
delivered. Backends whose bytes arrive outside our sockets (Mooncake) have each layer verified by
one verifier thread while later layers arrive.

Limits: at most ``max_connections`` connections (more are closed on accept), a connection that has
not authenticated within ``handshake_timeout_s`` is closed, and an authenticated connection with
nothing in flight that stays silent for ``idle_timeout_s`` is closed (its sender reconnects).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from prfaas.kv.layout import DTYPES, CacheLayout
from prfaas.kv.unit import KVExport, LayerPart
from prfaas.transfer import wire
from prfaas.transfer.auth import ServerHandshake, check_secret
from prfaas.transfer.backend import (
    Delivery,
    DeliveryCallback,
    FailureCallback,
    Peer,
    Receiver,
    TransferFailure,
    TransferTimings,
)
from prfaas.transfer.errors import (
    AbortedError,
    AuthError,
    CapacityError,
    ChecksumError,
    FrameError,
    LayoutMismatch,
    PeerClosed,
    TransferError,
)

log = logging.getLogger("prfaas.transfer.receiver")

_READ_BURST = 64 << 20  # bytes read from one connection before the loop looks at the others
_RECV_PIECE = 1 << 20  # bytes per recv_into: hashed right after, while still in cache
_HOUSEKEEPING_S = 0.1


@dataclass
class Assembly:
    """A request being received: its validated header and preallocated buffer."""

    wh: wire.WireHeader
    buf: torch.Tensor | None
    peer: Peer | None
    header_at: float
    header_wire_bytes: int
    received: list[int] = field(default_factory=list)
    checksums: list[int | None] = field(default_factory=list)
    records: list[list[wire.SliceRecord]] = field(default_factory=list)  # verified slices
    slice_bytes: list[int] = field(default_factory=list)  # from the COMMIT
    verified: list[bool] = field(default_factory=list)
    queued: list[bool] = field(default_factory=list)  # handed to the verifier
    committed: list[bool] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)  # bytes booked by readers (tcp)
    n_verified: int = 0
    payload_in: int = 0
    wire_bytes: int = 0
    first_data_at: float | None = None
    last_byte_at: float | None = None
    done: bool = False
    handle: object = None  # backend-specific (e.g. a registered address)
    lock: threading.Lock = field(default_factory=threading.Lock)
    view: memoryview | None = None  # the whole buffer as bytes

    def region(self, layer: int, tensor: int) -> memoryview:
        off = self.wh.offsets[layer][tensor]
        n = self.wh.layers[layer].tensors[tensor].nbytes
        assert self.view is not None
        return self.view[off : off + n]


class ReceiverSession:
    """The authenticated connections of one sender session and its requests in flight."""

    def __init__(self, session_id: bytes, n_conns: int, peer: Peer | None) -> None:
        self.id = session_id
        self.n_conns = n_conns
        self.peer = peer
        self.conns: dict[int, Conn] = {}
        self.streams: dict[int, Assembly] = {}
        self.max_seen = 0
        self.closed = False
        self.lock = threading.Lock()

    @property
    def socks(self) -> dict[int, socket.socket]:
        return {i: c.sock for i, c in self.conns.items()}


class Conn:
    """One accepted connection and where its reading stands (I/O thread only)."""

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.opened_at = now
        self.last_io = now
        self.hs: ServerHandshake | None = None
        self.session: ReceiverSession | None = None
        self.index = -1
        self.outbox = bytearray()
        self.closing = False  # close once the outbox is flushed
        # reading: a frame head, then a small payload into ``small``, or DATA bytes into ``dst``
        self.head = bytearray(wire.FRAME_HEAD.size)
        self.head_got = 0
        self.ftype = 0
        self.small: bytearray | None = None
        self.small_got = 0
        self.dst: memoryview | None = None  # where the current DATA slice goes
        self.dst_got = 0
        self.drain = 0  # bytes of a dropped slice still to discard
        self.data: tuple | None = None  # (assembly, layer, tensor, offset, n, digest)
        self.hasher: Any = None  # XXH3-64 state of the current slice
        self.parked_until: float | None = None  # DATA waiting for its header (other connection)
        self.parked_sub: tuple | None = None


class ReceiverBase(Receiver):
    """Listens on ``host:port`` (0 = any free port); ``start()`` then read ``address``.

    Outcomes go to ``on_delivery`` / ``on_failure`` when given, else to ``deliveries``.
    """

    backend_code = 0

    def __init__(
        self,
        layout: CacheLayout,
        secret: bytes | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_delivery: DeliveryCallback | None = None,
        on_failure: FailureCallback | None = None,
        max_request_bytes: int | None = None,
        max_inflight_bytes: int = 16 << 30,
        header_wait_s: float = 10.0,
        pin_memory: bool = False,
        pool_bytes: int = 2 << 30,
        max_connections: int = 256,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.layout = layout
        self.secret = check_secret(secret)
        self.host, self.port = host, port
        self.on_delivery = on_delivery
        self.on_failure = on_failure
        limit = wire.buffer_offsets(
            [
                wire.LayerDesc(
                    i,
                    k,
                    [
                        wire.TensorDesc(n, "uint8", (s.nbytes(layout.max_tokens),))
                        for n, s in layout.layer_specs(i).items()
                    ],
                )
                for i, k in enumerate(layout.layer_kinds)
            ]
        )[1]
        self.max_request_bytes = limit if max_request_bytes is None else max_request_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.header_wait_s = header_wait_s
        self.pin_memory = pin_memory
        self.pool_bytes = pool_bytes
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.refused_connections = 0  # closed on accept: over max_connections
        self.timed_out_connections = 0  # closed for a slow handshake or idleness
        self._pool: list[torch.Tensor] = []  # released receive buffers, reused best-fit
        self.deliveries: queue.Queue[Delivery | TransferFailure] = queue.Queue()
        self._sessions: dict[bytes, ReceiverSession] = {}
        self._conns: dict[int, Conn] = {}  # by fileno
        self._lock = threading.Lock()
        self._inflight = 0
        self._active = 0
        self._closed = False
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._verify_q: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._outgoing: set[Conn] = set()  # connections with replies queued by other threads
        self._sel: selectors.BaseSelector | None = None

    # --- public
    def start(self) -> ReceiverBase:
        ls = socket.create_server((self.host, self.port), backlog=128)
        ls.setblocking(False)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(ls, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for target, name in ((self._io_loop, "rx-io"), (self._verify_loop, "rx-verify")):
            t = threading.Thread(target=target, daemon=True, name=name)
            t.start()
            self._threads.append(t)
        return self

    @property
    def address(self) -> Peer:
        return (self.host, self.port)

    @property
    def inflight_bytes(self) -> int:
        """Bytes of receive buffers currently allocated for unfinished requests."""
        with self._lock:
            return self._inflight

    @property
    def active_streams(self) -> int:
        with self._lock:
            return self._active

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._verify_q.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> ReceiverBase:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        """The one place a request's receive buffer is allocated (after validation): a released
        buffer of size in [n, 2n] if the pool has one (already faulted in / pinned), else new."""
        with self._lock:
            fits = [i for i, b in enumerate(self._pool) if nbytes <= b.numel() <= 2 * nbytes]
            if fits:  # by index: list.remove would compare tensors elementwise
                best = self._pool.pop(min(fits, key=lambda i: self._pool[i].numel()))
                return best[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def _recycle(self, buf: torch.Tensor) -> None:
        base = buf._base if buf._base is not None else buf
        with self._lock:
            self._pool.append(base)
            self._pool.sort(key=lambda b: -b.numel())
            while sum(b.numel() for b in self._pool) > self.pool_bytes:
                self._pool.pop(0)  # drop the largest

    @property
    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._pool)

    # --- backend hooks
    def _on_allocated(self, session: ReceiverSession, asm: Assembly) -> None:
        """Called once a request's buffer exists (mooncake registers and replies here)."""

    def _on_freed(self, asm: Assembly) -> None:
        """Called when a request's buffer is released (delivered or failed)."""

    def _on_commit(self, asm: Assembly, layer: int, nbytes: int) -> None:
        """A COMMIT arrived; tcp checks bytes were received, mooncake marks them written."""

    def _accepts_data(self) -> bool:
        """Whether DATA frames carry this backend's layer bytes (tcp)."""
        return False

    # --- reporting
    def _report(self, item: Delivery | TransferFailure) -> None:
        """Hand ``item`` out once: to its callback when there is one, else on ``deliveries``."""
        cb = self.on_delivery if isinstance(item, Delivery) else self.on_failure
        if cb is None:
            self.deliveries.put(item)
            return
        try:
            cb(item)  # type: ignore[arg-type]
        except Exception:  # a consumer bug must not kill the transport
            log.exception("transfer consumer callback failed")

    def _reply(self, session: ReceiverSession, ftype: int, obj: dict) -> None:
        """Queue a control frame to the session's sender (connection 0); any thread."""
        conn = session.conns.get(0)
        if conn is None or session.closed:
            return
        data = wire.frame(ftype, json.dumps(obj).encode())
        with self._lock:
            conn.outbox += data
            self._outgoing.add(conn)
        if threading.current_thread() is not self._threads[0]:
            self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    # --- the I/O thread
    def _io_loop(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            next_house = time.monotonic() + _HOUSEKEEPING_S
            while not self._closed:
                for key, mask in sel.select(max(0.0, next_house - time.monotonic())):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError, OSError):
                            while self._wake_r.recv(4096):
                                pass
                        self._woken = False  # after draining: a wake-up since then is seen
                    else:
                        conn: Conn = key.data
                        if mask & selectors.EVENT_READ and not conn.closing:
                            self._guard(conn, self._on_readable)
                        if mask & selectors.EVENT_WRITE:
                            self._guard(conn, self._flush)
                with self._lock:
                    outgoing, self._outgoing = self._outgoing, set()
                for conn in outgoing:
                    self._guard(conn, self._flush)
                now = time.monotonic()
                if now >= next_house:
                    next_house = now + _HOUSEKEEPING_S
                    self._housekeeping(now)
        finally:
            self._shutdown_all()

    def _guard(self, conn: Conn, fn) -> None:  # type: ignore[no-untyped-def]
        """Run ``fn(conn)``; a transfer error or socket error ends the connection's session."""
        if conn.sock.fileno() < 0:
            return
        try:
            fn(conn)
        except TransferError as e:
            self._conn_failed(conn, e)
        except OSError as e:
            self._conn_failed(conn, PeerClosed(f"connection lost: {e}"))

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= self.max_connections
            if full:
                self.refused_connections += 1
                sock.close()
                continue
            wire.tune_socket(sock)
            sock.setblocking(False)
            conn = Conn(sock, addr[:2], time.monotonic())
            conn.hs = ServerHandshake(self.secret)
            with self._lock:
                self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _housekeeping(self, now: float) -> None:
        with self._lock:
            conns = list(self._conns.values())
        idle: dict[int, ReceiverSession] = {}
        for conn in conns:
            if conn.parked_until is not None:
                self._guard(conn, self._retry_parked)
            elif conn.session is None:
                if now - conn.opened_at > self.handshake_timeout_s:
                    self.timed_out_connections += 1
                    self._conn_failed(conn, AuthError("no authentication in time"))
            else:
                s = conn.session
                last = max(c.last_io for c in s.conns.values())
                if not s.streams and now - last > self.idle_timeout_s:
                    idle[id(s)] = s
        for s in idle.values():
            self.timed_out_connections += len(s.conns)
            self._fail_session(s, PeerClosed("idle connection closed"), report=False)

    def _flush(self, conn: Conn) -> None:
        if conn.parked_until is not None:  # not selectable now; flushed when it resumes
            return
        with self._lock:
            data = bytes(conn.outbox)
        if data:
            try:
                n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            with self._lock:
                del conn.outbox[:n]
                left = len(conn.outbox)
        else:
            left = 0
        assert self._sel is not None
        if conn.sock.fileno() < 0:
            return
        if left:
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        else:
            if conn.closing:
                self._close_conn(conn)
                return
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _send_now(self, conn: Conn, data: bytes) -> None:
        with self._lock:
            conn.outbox += data
        self._flush(conn)

    def _close_conn(self, conn: Conn) -> None:
        with self._lock:
            self._conns.pop(conn.sock.fileno(), None)
            self._outgoing.discard(conn)
        if self._sel is not None and conn.sock.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.sock.close()

    def _conn_failed(self, conn: Conn, error: TransferError) -> None:
        if conn.session is not None:
            self._fail_session(conn.session, error)
            return
        if conn.hs is not None and conn.hs.reply and conn.sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                conn.sock.send(conn.hs.reply)  # best effort: the refusal's reason
        self._close_conn(conn)
        self._report(TransferFailure(None, error, conn.peer))

    def _shutdown_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            conns = list(self._conns.values())
        for s in sessions:
            self._fail_session(s, PeerClosed("receiver closed"))
        for c in conns:
            if c.sock.fileno() >= 0:
                self._close_conn(c)
        if self._listener is not None:
            self._listener.close()
        if self._sel is not None:
            self._sel.close()

    # --- reading
    def _on_readable(self, conn: Conn) -> None:
        budget = _READ_BURST
        while budget > 0 and not conn.closing and conn.parked_until is None:
            if conn.dst is not None:  # DATA bytes straight into the request's buffer
                want = min(len(conn.dst) - conn.dst_got, _RECV_PIECE)
                n = self._recv_into(conn, conn.dst[conn.dst_got :], want)
                if n is None:
                    return
                conn.hasher.update(conn.dst[conn.dst_got : conn.dst_got + n])  # still in cache
                conn.dst_got += n
                budget -= n
                if conn.dst_got == len(conn.dst):
                    conn.dst = None
                    self._data_done(conn)
                continue
            if conn.drain:
                scratch = _scratch()
                n = self._recv_into(conn, scratch, min(conn.drain, len(scratch)))
                if n is None:
                    return
                conn.drain -= n
                budget -= n
                continue
            if conn.small is not None:
                want = len(conn.small) - conn.small_got
                if want:
                    n = self._recv_into(conn, memoryview(conn.small)[conn.small_got :], want)
                    if n is None:
                        return
                    conn.small_got += n
                if conn.small_got == len(conn.small):
                    payload, conn.small = bytes(conn.small), None
                    self._on_frame(conn, conn.ftype, payload)
                continue
            want = len(conn.head) - conn.head_got
            n = self._recv_into(conn, memoryview(conn.head)[conn.head_got :], want, frame_edge=True)
            if n is None:
                return
            conn.head_got += n
            if conn.head_got < len(conn.head):
                continue
            conn.head_got = 0
            ftype, size = wire.parse_frame_head(conn.head, self._allowed(conn))
            conn.ftype = ftype
            if ftype == wire.DATA:
                if size < wire.DATA_HEAD.size:
                    raise FrameError(f"DATA frame of {size} B is shorter than its sub-header")
                conn.small = bytearray(wire.DATA_HEAD.size)
                conn.small_got = 0
                conn.data = (size - wire.DATA_HEAD.size,)
            else:
                conn.small = bytearray(size)
                conn.small_got = 0

    def _recv_into(
        self, conn: Conn, view: memoryview, n: int, frame_edge: bool = False
    ) -> int | None:
        """Non-blocking read of up to ``n`` bytes; None when nothing is there now. A clean close
        at a frame boundary ends the session quietly; anywhere else it is PeerClosed."""
        try:
            got = conn.sock.recv_into(view, n)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if conn.session is not None and conn.session.closed:
                return None
            raise PeerClosed(f"connection lost: {e}") from e
        if got == 0:
            if frame_edge and conn.head_got == 0 and conn.small is None:
                if conn.session is not None:
                    self._fail_session(
                        conn.session, PeerClosed("peer closed the connection"), report=False
                    )
                    return None
                raise PeerClosed("peer closed the connection before authenticating")
            if conn.small is not None:
                raise PeerClosed(
                    f"connection closed after {conn.small_got} of {len(conn.small)} bytes"
                )
            raise PeerClosed("connection closed in the middle of a frame")
        conn.last_io = time.monotonic()
        return got

    def _allowed(self, conn: Conn) -> set[int]:
        if conn.session is None:
            assert conn.hs is not None
            return conn.hs.allowed
        return {wire.HEADER, wire.DATA, wire.COMMIT_T, wire.ABORT}

    def _on_frame(self, conn: Conn, ftype: int, payload: bytes) -> None:
        if conn.session is None:
            assert conn.hs is not None
            self._send_now(conn, conn.hs.on_frame(ftype, payload))
            if conn.hs.hello is not None:
                self._join(conn)
            return
        session = conn.session
        if ftype == wire.DATA:
            self._on_data_head(conn, payload)
        elif ftype == wire.HEADER:
            self._on_header(session, payload, len(payload))
        elif ftype == wire.COMMIT_T:
            self._on_commit_frame(session, payload)
        else:  # ABORT
            o = wire.parse_json_payload(payload, "abort")
            asm = session.streams.get(o.get("stream_id"))  # type: ignore[arg-type]
            if asm is not None:
                msg = f"sender aborted {asm.wh.header.request_id!r}: {o.get('message')}"
                self._fail_stream(session, asm, AbortedError(msg), notify=False)

    def _join(self, conn: Conn) -> None:
        assert conn.hs is not None and conn.hs.hello is not None
        hello = conn.hs.hello
        if hello.backend != self.backend_code:
            raise FrameError(f"peer uses backend {hello.backend}, this is {self.backend_code}")
        with self._lock:
            session = self._sessions.get(hello.session_id)
            if session is None:
                session = ReceiverSession(hello.session_id, hello.n_conns, conn.peer)
                self._sessions[hello.session_id] = session
        if hello.conn_index in session.conns or hello.n_conns != session.n_conns:
            raise FrameError("duplicate connection index")
        session.conns[hello.conn_index] = conn
        conn.session, conn.index, conn.hs = session, hello.conn_index, None

    def _fail_session(
        self, session: ReceiverSession, error: TransferError, report: bool = True
    ) -> None:
        with session.lock:
            if session.closed:
                return
            session.closed = True
            streams = list(session.streams.values())
        with self._lock:
            self._sessions.pop(session.id, None)
        for asm in streams:
            self._fail_stream(session, asm, error, notify=False)
        for c in list(session.conns.values()):
            if c.sock.fileno() >= 0:
                self._close_conn(c)
        if report and not streams:
            self._report(TransferFailure(None, error, session.peer))

    # --- DATA (tcp)
    def _on_data_head(self, conn: Conn, sub: bytes) -> None:
        if not self._accepts_data():
            raise FrameError("DATA frames are not used by this backend")
        n = conn.data[0]  # type: ignore[index]
        sid, layer, ti, off, digest = wire.DATA_HEAD.unpack(sub)
        session = conn.session
        assert session is not None
        if sid > session.max_seen:  # data overtook its header on another connection: wait
            if conn.index == 0:  # headers travel on connection 0: this one is not coming
                raise FrameError(f"data for unannounced stream {sid}")
            conn.parked_until = time.monotonic() + self.header_wait_s
            conn.parked_sub = (sid, layer, ti, off, n, digest)
            assert self._sel is not None
            self._sel.unregister(conn.sock)
            return
        self._start_slice(conn, sid, layer, ti, off, n, digest)

    def _retry_parked(self, conn: Conn) -> None:
        assert conn.parked_sub is not None and conn.session is not None
        sid, layer, ti, off, n, digest = conn.parked_sub
        if conn.session.closed:
            return
        if sid > conn.session.max_seen:
            if time.monotonic() > (conn.parked_until or 0):
                raise FrameError(f"data for unannounced stream {sid}")
            return
        conn.parked_until, conn.parked_sub = None, None
        assert self._sel is not None
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        self._flush(conn)
        self._start_slice(conn, sid, layer, ti, off, n, digest)
        self._on_readable(conn)

    def _unpark(self, session: ReceiverSession) -> None:
        """A header arrived: resume connections whose DATA waited for it."""
        for c in list(session.conns.values()):
            if c.parked_until is not None:
                self._guard(c, self._retry_parked)

    def _start_slice(
        self, conn: Conn, sid: int, layer: int, ti: int, off: int, n: int, digest: int
    ) -> None:
        session = conn.session
        assert session is not None
        asm = session.streams.get(sid)
        if asm is None or asm.view is None:  # finished or refused request: discard its bytes
            conn.drain = n
            return
        wh = asm.wh
        if layer >= len(wh.layers) or ti >= len(wh.layers[layer].tensors):
            raise FrameError(f"DATA for unknown layer {layer} tensor {ti} of stream {sid}")
        tnbytes = wh.layers[layer].tensors[ti].nbytes
        if off + n > tnbytes:
            raise FrameError(
                f"DATA [{off}, {off + n}) outside layer {layer} tensor {ti} of {tnbytes} B"
            )
        with asm.lock:  # book the bytes first: nothing is written past what was announced
            if asm.reserved[layer] + n > wh.layers[layer].nbytes:
                raise FrameError(f"more bytes than announced for layer {layer} of stream {sid}")
            asm.reserved[layer] += n
            if asm.first_data_at is None:
                asm.first_data_at = time.time()
        off0 = wh.offsets[layer][ti] + off
        conn.data = (asm, layer, ti, off, n, digest)
        conn.dst = asm.view[off0 : off0 + n]
        conn.dst_got = 0
        conn.hasher = xxhash.xxh3_64()
        if n == 0:
            conn.dst = None
            self._data_done(conn)

    def _data_done(self, conn: Conn) -> None:
        asm, layer, ti, off, n, digest = conn.data  # type: ignore[misc]
        conn.data = None
        ok, conn.hasher = conn.hasher.intdigest() == digest, None
        wh = asm.wh
        assert conn.session is not None
        if not ok:
            msg = f"request {wh.header.request_id!r} layer {layer}: slice checksum mismatch"
            self._fail_stream(conn.session, asm, ChecksumError(msg), notify=True)
            return
        with asm.lock:
            asm.records[layer].append((ti, off, n, digest))
            asm.received[layer] += n
            asm.payload_in += n
            asm.wire_bytes += wire.DATA_OVERHEAD + n
            if asm.payload_in == wh.payload_nbytes:
                asm.last_byte_at = time.time()
        assert conn.session is not None
        self._progress(conn.session, asm, layer)

    # --- requests
    def _on_header(self, session: ReceiverSession, payload: bytes, size: int) -> None:
        now = time.time()
        wh = wire.decode_header(payload)  # ChecksumError / FrameError: the session is unusable
        sid = wh.stream_id
        if sid <= session.max_seen:
            raise FrameError(f"stream id {sid} not increasing (last {session.max_seen})")
        rid = wh.header.request_id
        try:
            wire.validate_header(wh, self.layout, self.max_request_bytes)
            with self._lock:
                if self._inflight + wh.buffer_nbytes > self.max_inflight_bytes:
                    raise CapacityError(
                        f"{wh.buffer_nbytes} B would exceed the in-flight limit "
                        f"{self.max_inflight_bytes} B ({self._inflight} B in use)"
                    )
                self._inflight += wh.buffer_nbytes
                self._active += 1
        except (LayoutMismatch, CapacityError) as e:
            session.max_seen = sid
            self._reply(session, wire.DONE, self._done_obj(sid, e))
            self._report(TransferFailure(rid, e, session.peer))
            self._unpark(session)
            return
        buf = self._allocate(wh.buffer_nbytes)
        n_layers = len(wh.layers)
        asm = Assembly(
            wh,
            buf,
            session.peer,
            now,
            wire.FRAME_HEAD.size + size,
            received=[0] * n_layers,
            checksums=[ld.checksum for ld in wh.layers],
            records=[[] for _ in range(n_layers)],
            slice_bytes=[0] * n_layers,
            verified=[False] * n_layers,
            queued=[False] * n_layers,
            committed=[False] * n_layers,
            reserved=[0] * n_layers,
        )
        asm.view = memoryview(buf.numpy()).cast("B") if wh.buffer_nbytes else memoryview(b"")
        asm.wire_bytes = asm.header_wire_bytes
        with session.lock:
            session.streams[sid] = asm
        session.max_seen = sid
        try:
            self._on_allocated(session, asm)
        except TransferError as e:
            self._fail_stream(session, asm, e, notify=True)
        self._unpark(session)

    def _on_commit_frame(self, session: ReceiverSession, payload: bytes) -> None:
        sid, layer, nbytes, digest, slice_bytes = wire.COMMIT.unpack(payload)
        if slice_bytes == 0:
            raise FrameError("COMMIT with a zero slice size")
        if sid > session.max_seen:
            raise FrameError(f"COMMIT for unannounced stream {sid}")
        asm = session.streams.get(sid)
        if asm is None:
            return
        if layer >= len(asm.wh.layers) or nbytes != asm.wh.layers[layer].nbytes:
            raise FrameError(f"COMMIT for layer {layer} with {nbytes} B does not match the header")
        with asm.lock:
            asm.wire_bytes += wire.COMMIT_FRAME_BYTES
            if asm.committed[layer]:
                err: TransferError | None = FrameError(f"second COMMIT for layer {layer}")
            elif asm.checksums[layer] is not None and asm.checksums[layer] != digest:
                err = ChecksumError(f"layer {layer} checksum in COMMIT differs from the header's")
            else:
                err = None
                asm.checksums[layer] = digest
                asm.slice_bytes[layer] = slice_bytes
                asm.committed[layer] = True
                self._on_commit(asm, layer, nbytes)
        if err is not None:
            self._fail_stream(session, asm, err, notify=True)
            return
        self._progress(session, asm, layer)

    def _progress(self, session: ReceiverSession, asm: Assembly, layer: int) -> None:
        """Once all of ``layer``'s bytes and its COMMIT are in, verify it: here from the slice
        digests already checked (tcp), else on the verifier thread from the buffer."""
        ld = asm.wh.layers[layer]
        with asm.lock:
            if asm.done or asm.queued[layer] or asm.received[layer] != ld.nbytes:
                return
            if not asm.committed[layer]:  # the sender's COMMIT closes a layer
                return
            asm.queued[layer] = True
        if self._verifies_inline():
            self._verify(session, asm, layer)
        else:
            self._verify_q.put((session, asm, layer))

    def _verifies_inline(self) -> bool:
        """Whether the layer bytes were hashed as they were read (our DATA frames)."""
        return False

    # --- the verifier thread
    def _verify_loop(self) -> None:
        while True:
            job = self._verify_q.get()
            if job is None:
                return
            session, asm, layer = job
            try:
                self._verify(session, asm, layer)
            except Exception:  # never let the verifier die
                log.exception("verifying layer %d failed", layer)

    def _verify(self, session: ReceiverSession, asm: Assembly, layer: int) -> None:
        ld = asm.wh.layers[layer]
        with asm.lock:
            if asm.done or asm.view is None:
                return
            views = [asm.region(layer, ti) for ti in range(len(ld.tensors))]
            records = list(asm.records[layer])
        if not self._verifies_inline():  # hash the layer now, as the sender cut it
            records = wire.slice_records(views, asm.slice_bytes[layer])
        ok = wire.layer_checksum(records) == asm.checksums[layer]
        complete = False
        with asm.lock:
            if asm.done:
                return
            if ok:
                asm.verified[layer] = True
                asm.n_verified += 1
                complete = asm.n_verified == len(asm.wh.layers)
        if not ok:
            msg = f"request {asm.wh.header.request_id!r} layer {layer}: checksum mismatch"
            self._fail_stream(session, asm, ChecksumError(msg), notify=True)
        elif complete:
            self._deliver(session, asm)

    def _release(self, session: ReceiverSession, asm: Assembly) -> bool:
        with asm.lock:
            if asm.done:
                return False
            asm.done = True
        with session.lock:
            session.streams.pop(asm.wh.stream_id, None)
        with self._lock:
            self._inflight -= asm.wh.buffer_nbytes
            self._active -= 1
        self._on_freed(asm)
        return True

    def _fail_stream(
        self, session: ReceiverSession, asm: Assembly, error: TransferError, notify: bool
    ) -> None:
        if not self._release(session, asm):
            return
        asm.buf, asm.view = None, None
        if notify:
            self._reply(session, wire.DONE, self._done_obj(asm.wh.stream_id, error))
        self._report(TransferFailure(asm.wh.header.request_id, error, session.peer))

    def _deliver(self, session: ReceiverSession, asm: Assembly) -> None:
        if not self._release(session, asm):
            return
        wh, buf = asm.wh, asm.buf
        assert buf is not None
        parts = []
        for li, ld in enumerate(wh.layers):
            tensors = {}
            for ti, td in enumerate(ld.tensors):
                off = wh.offsets[li][ti]
                tensors[td.name] = (
                    buf[off : off + td.nbytes].view(DTYPES[td.dtype]).view(td.shape)
                    if td.nbytes
                    else torch.empty(td.shape, dtype=DTYPES[td.dtype])
                )
            parts.append(LayerPart(ld.layer, ld.kind, tensors))
        now = time.time()
        timings = TransferTimings(
            request_id=wh.header.request_id,
            header_at=asm.header_at,
            first_data_at=asm.first_data_at,
            last_byte_at=asm.last_byte_at or now,
            delivered_at=now,
            payload_bytes=wh.payload_nbytes,
            wire_bytes=asm.wire_bytes,
        )
        self._reply(session, wire.DONE, {"stream_id": wh.stream_id, "ok": True})
        export = KVExport(wh.header, parts)
        self._report(Delivery(export, timings, session.peer, lambda: self._recycle(buf)))

    @staticmethod
    def _done_obj(sid: int, error: TransferError) -> dict:
        return {"stream_id": sid, "ok": False, "code": error.code, "message": str(error)}


_SCRATCH = threading.local()


def _scratch() -> memoryview:
    """A 1 MiB per-thread buffer that discarded bytes are read into."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None:
        buf = _SCRATCH.buf = memoryview(bytearray(1 << 20))
    return buf
