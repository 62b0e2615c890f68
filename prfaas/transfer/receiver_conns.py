"""The receiver's I/O thread (``ConnectionLoop``, a mixin of ``ReceiverBase``): accepting, the HMAC
handshake as a state machine, grouping authenticated connections into sender sessions, reading
frames (non-blocking), and DATA slices read straight into the request's buffer (``recv_into``) and
hashed piece by piece while still in cache (XXH3-64, checked per slice).

Limits: at most ``max_connections`` connections (more are closed on accept), a connection that has
not authenticated within ``handshake_timeout_s`` is closed, and an authenticated connection with
nothing in flight that stays silent for ``idle_timeout_s`` is closed (its sender reconnects).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time

import xxhash

from prfaas.transfer import wire
from prfaas.transfer.auth import ServerHandshake
from prfaas.transfer.backend import (
    TransferFailure,
)
from prfaas.transfer.errors import (
    AbortedError,
    AuthError,
    ChecksumError,
    FrameError,
    PeerClosed,
    TransferError,
)
from prfaas.transfer.receiver_state import Conn, ReceiverSession, _scratch

_READ_BURST = 64 << 20  # bytes read from one connection before the loop looks at the others
_RECV_PIECE = 256 << 10  # bytes per recv_into: hashed right after, while still in L2
_HOUSEKEEPING_S = 0.1


class ConnectionLoop:
    """The I/O thread of ``ReceiverBase`` (a mixin: the state lives there)."""

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
                budget = self._read_slice(conn, budget)
                if conn.dst is not None:  # nothing more there now (or the burst is spent)
                    return
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

    def _read_slice(self, conn: Conn, budget: int) -> int:
        """Read the current DATA slice's bytes into its buffer (``conn.dst``) in pieces of at
        most ``_RECV_PIECE``, each hashed right after it landed (still in cache), until the
        slice is complete (``conn.dst`` None), nothing more is there or ``budget`` is spent;
        returns what is left of the budget. The loop for almost every byte received: kept
        to a recv_into, a hash update and a few local variables per piece."""
        dst, got, hasher = conn.dst, conn.dst_got, conn.hasher
        assert dst is not None
        end = len(dst)
        recv_into = conn.sock.recv_into
        try:
            while got < end and budget > 0:
                n = recv_into(dst[got:], min(end - got, _RECV_PIECE))
                if not n:
                    raise PeerClosed("connection closed in the middle of a frame")
                if hasher is not None:  # else the verifier thread hashes the layer
                    hasher.update(dst[got : got + n])
                got += n
                budget -= n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            if conn.session is None or not conn.session.closed:
                raise PeerClosed(f"connection lost: {e}") from e
        if got != conn.dst_got:
            conn.dst_got = got
            conn.last_io = time.monotonic()
        if got == end:
            conn.dst = None
        elif budget > 0:  # stopped by an empty socket: wait for readiness
            budget = -1
        return budget

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
        conn.hasher = xxhash.xxh3_64() if self._verifies_inline() else None
        if n == 0:
            conn.dst = None
            self._data_done(conn)

    def _data_done(self, conn: Conn) -> None:
        asm, layer, ti, off, n, digest = conn.data  # type: ignore[misc]
        conn.data = None
        ok = conn.hasher is None or conn.hasher.intdigest() == digest
        conn.hasher = None
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
