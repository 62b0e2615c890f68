"""Receiver side shared by the backends: ``ReceiverBase``.

One event-driven I/O thread (``receiver_conns.ConnectionLoop``) accepts and authenticates
connections and reads layer bytes straight into each request's buffer; the request life cycle
(``receiver_requests.RequestAssembly``) validates each announced request against the
``CacheLayout`` before allocating its buffer, verifies each layer (XXH3-64) and delivers only
complete, verified exports; per-request, per-session and per-connection state is in
``receiver_state``. This module holds the configuration, the buffer pool, the backend hooks and
the one reporting path (callbacks or the ``deliveries`` queue).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import selectors
import socket
import threading

import torch

from prfaas.kv.layout import CacheLayout
from prfaas.transfer import wire
from prfaas.transfer.auth import check_secret
from prfaas.transfer.backend import (
    Delivery,
    DeliveryCallback,
    FailureCallback,
    LayerCallback,
    Peer,
    Receiver,
    TransferFailure,
)
from prfaas.transfer.receiver_conns import ConnectionLoop
from prfaas.transfer.receiver_requests import RequestAssembly
from prfaas.transfer.receiver_state import Assembly, Conn, ReceiverSession

log = logging.getLogger("prfaas.transfer.receiver")

__all__ = ["Assembly", "Conn", "ReceiverBase", "ReceiverSession"]


class ReceiverBase(ConnectionLoop, RequestAssembly, Receiver):
    """Listens on ``host:port`` (0 = any free port); ``start()`` then read ``address``.

    Outcomes go to ``on_delivery`` / ``on_failure`` when given, else to ``deliveries``; with
    ``on_layer``, each layer goes there too once verified, while later layers are still in flight
    (on the I/O thread for tcp, the verifier thread for mooncake: the callback must be quick).
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
        on_layer: LayerCallback | None = None,
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
        self.on_layer = on_layer  # each verified layer as it lands (before the delivery)
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
