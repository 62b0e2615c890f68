"""Receiver side shared by the backends: accepts and authenticates connections, groups them into
peer sessions, validates each announced request against the ``CacheLayout`` before allocating its
buffer, assembles and verifies the layers, and delivers only complete, checksummed exports."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch

from prfaas.kv.layout import DTYPES, CacheLayout
from prfaas.kv.unit import KVExport, LayerPart
from prfaas.transfer import wire
from prfaas.transfer.auth import check_secret, server_handshake
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
    CapacityError,
    ChecksumError,
    FrameError,
    LayoutMismatch,
    PeerClosed,
    TransferError,
)

_SCRATCH = 1 << 20
log = logging.getLogger("prfaas.transfer.receiver")


@dataclass
class Assembly:
    """A request being received: its validated header and preallocated buffer."""

    wh: wire.WireHeader
    buf: torch.Tensor | None
    peer: Peer | None
    header_at: float
    header_wire_bytes: int
    received: list[int] = field(default_factory=list)
    crcs: list[int | None] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
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

    def region(self, layer: int, tensor: int) -> memoryview:
        off = self.wh.offsets[layer][tensor]
        n = self.wh.layers[layer].tensors[tensor].nbytes
        assert self.buf is not None
        return memoryview(self.buf.numpy()).cast("B")[off : off + n]


class ReceiverSession:
    """The authenticated connections of one sender session and its requests in flight."""

    def __init__(self, session_id: bytes, n_conns: int, peer: Peer | None) -> None:
        self.id = session_id
        self.n_conns = n_conns
        self.peer = peer
        self.socks: dict[int, socket.socket] = {}
        self.streams: dict[int, Assembly] = {}
        self.max_seen = 0
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.closed = False


class ReceiverBase(Receiver):
    """Listens on ``host:port`` (0 = any free port); ``start()`` then read ``address``."""

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
        self._pool: list[torch.Tensor] = []  # released receive buffers, reused best-fit
        self.deliveries: queue.Queue[Delivery | TransferFailure] = queue.Queue()
        self._sessions: dict[bytes, ReceiverSession] = {}
        self._lock = threading.Lock()
        self._inflight = 0
        self._active = 0
        self._closed = False
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # --- public
    def start(self) -> ReceiverBase:
        ls = socket.create_server((self.host, self.port), backlog=128)
        ls.settimeout(0.2)
        self._listener = ls
        self.port = ls.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, daemon=True, name="rx-accept")
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

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            self._fail_session(s, PeerClosed("receiver closed"))
        for t in self._threads:
            t.join(timeout=2)

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

    def _handle_data(self, session: ReceiverSession, sock: socket.socket, size: int) -> None:
        raise FrameError("DATA frames are not used by this backend")

    def _on_commit(self, asm: Assembly, layer: int, nbytes: int) -> None:
        """A COMMIT arrived; tcp checks bytes were received, mooncake marks them written."""

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
        sock = session.socks.get(0)
        if sock is None or session.closed:
            return
        try:
            with session.send_lock:
                wire.send_buffers(sock, [wire.frame(ftype, json.dumps(obj).encode())])
        except TransferError:
            pass

    # --- connections
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            wire.tune_socket(sock)
            t = threading.Thread(target=self._conn_main, args=(sock, addr[:2]), daemon=True)
            t.start()

    def _conn_main(self, sock: socket.socket, peer: Peer) -> None:
        try:
            hello = server_handshake(sock, self.secret)
            if hello.backend != self.backend_code:
                raise FrameError(f"peer uses backend {hello.backend}, this is {self.backend_code}")
        except TransferError as e:
            sock.close()
            self._report(TransferFailure(None, e, peer))
            return
        except OSError as e:
            sock.close()
            self._report(TransferFailure(None, PeerClosed(f"handshake: {e}"), peer))
            return
        with self._lock:
            session = self._sessions.get(hello.session_id)
            if session is None:
                session = ReceiverSession(hello.session_id, hello.n_conns, peer)
                self._sessions[hello.session_id] = session
        if hello.conn_index in session.socks or hello.n_conns != session.n_conns:
            sock.close()
            self._report(TransferFailure(None, FrameError("duplicate connection index"), peer))
            return
        session.socks[hello.conn_index] = sock
        try:
            self._read_loop(session, sock)
        except TransferError as e:
            self._fail_session(session, e)
        except OSError as e:
            self._fail_session(session, PeerClosed(str(e)))
        else:  # clean close at a frame boundary: only unfinished requests are reported
            self._fail_session(session, PeerClosed("peer closed the connection"), report=False)

    def _read_loop(self, session: ReceiverSession, sock: socket.socket) -> None:
        allowed = {wire.HEADER, wire.DATA, wire.COMMIT_T, wire.ABORT}
        while True:
            head = bytearray(wire.FRAME_HEAD.size)
            try:
                got = sock.recv_into(head)
            except OSError as e:
                if session.closed:
                    return
                raise PeerClosed(f"connection lost: {e}") from e
            if got == 0:
                return
            if got < len(head):
                wire.recv_into_exact(sock, memoryview(head)[got:])
            ftype, size = wire.parse_frame_head(head, allowed)
            if ftype == wire.DATA:
                self._handle_data(session, sock, size)
            elif ftype == wire.HEADER:
                self._on_header(session, wire.recv_exact(sock, size), size)
            elif ftype == wire.COMMIT_T:
                self._on_commit_frame(session, wire.recv_exact(sock, size))
            else:  # ABORT
                o = wire.parse_json_payload(wire.recv_exact(sock, size), "abort")
                asm = session.streams.get(o.get("stream_id"))  # type: ignore[arg-type]
                if asm is not None:
                    msg = f"sender aborted {asm.wh.header.request_id!r}: {o.get('message')}"
                    self._fail_stream(session, asm, AbortedError(msg), notify=False)

    def _fail_session(
        self, session: ReceiverSession, error: TransferError, report: bool = True
    ) -> None:
        with session.cond:
            if session.closed:
                return
            session.closed = True
            streams = list(session.streams.values())
            session.cond.notify_all()
        with self._lock:
            self._sessions.pop(session.id, None)
        for asm in streams:
            self._fail_stream(session, asm, error, notify=False)
        for s in list(session.socks.values()):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        if report and not streams:
            self._report(TransferFailure(None, error, session.peer))

    # --- requests
    def _on_header(self, session: ReceiverSession, payload: bytes, size: int) -> None:
        now = time.time()
        wh = wire.decode_header(payload)  # ChecksumError / FrameError: the session is unusable
        sid = wh.stream_id
        with session.cond:
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
            with session.cond:
                session.max_seen = sid
                session.cond.notify_all()
            self._reply(session, wire.DONE, self._done_obj(sid, e))
            self._report(TransferFailure(rid, e, session.peer))
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
            crcs=[ld.crc32 for ld in wh.layers],
            verified=[False] * n_layers,
            committed=[False] * n_layers,
            reserved=[0] * n_layers,
        )
        asm.wire_bytes = asm.header_wire_bytes
        with session.cond:
            session.streams[sid] = asm
            session.max_seen = sid
            session.cond.notify_all()
        try:
            self._on_allocated(session, asm)
        except TransferError as e:
            self._fail_stream(session, asm, e, notify=True)
            return

    def _lookup(self, session: ReceiverSession, sid: int) -> Assembly | None:
        """The assembly of stream ``sid``; None if it is finished or was refused."""
        deadline = time.monotonic() + self.header_wait_s
        with session.cond:
            while sid > session.max_seen:  # data overtook its header on another connection
                left = deadline - time.monotonic()
                if session.closed:
                    raise PeerClosed("session closed")
                if left <= 0:
                    raise FrameError(f"data for unannounced stream {sid}")
                session.cond.wait(left)
            return session.streams.get(sid)

    def _on_commit_frame(self, session: ReceiverSession, payload: bytes) -> None:
        sid, layer, nbytes, crc = wire.COMMIT.unpack(payload)
        asm = self._lookup(session, sid)
        if asm is None:
            return
        if layer >= len(asm.wh.layers) or nbytes != asm.wh.layers[layer].nbytes:
            raise FrameError(f"COMMIT for layer {layer} with {nbytes} B does not match the header")
        with asm.lock:
            asm.wire_bytes += wire.COMMIT_FRAME_BYTES
            if asm.committed[layer]:
                err: TransferError | None = FrameError(f"second COMMIT for layer {layer}")
            elif asm.crcs[layer] is not None and asm.crcs[layer] != crc:
                err = ChecksumError(f"layer {layer} checksum in COMMIT differs from the header's")
            else:
                err = None
                asm.crcs[layer] = crc
                asm.committed[layer] = True
                self._on_commit(asm, layer, nbytes)
        if err is not None:
            self._fail_stream(session, asm, err, notify=True)
            return
        self._progress(session, asm, layer)

    def _progress(self, session: ReceiverSession, asm: Assembly, layer: int) -> None:
        """Verify ``layer`` once all its bytes and its checksum are in; deliver when all are."""
        ld = asm.wh.layers[layer]
        with asm.lock:
            if asm.done or asm.verified[layer] or asm.received[layer] != ld.nbytes:
                return
            if not asm.committed[layer]:  # the sender's COMMIT closes a layer
                return
            crc = 0
            for ti in range(len(ld.tensors)):
                crc = zlib.crc32(asm.region(layer, ti), crc)
            ok = crc == asm.crcs[layer]
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
        with session.cond:
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
        asm.buf = None
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
