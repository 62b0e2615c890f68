"""What a receiver keeps per request (``Assembly``: header, buffer, per-layer progress), per sender
session (``ReceiverSession``) and per connection (``Conn``: where its reading stands)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from prfaas.transfer import wire
from prfaas.transfer.auth import ServerHandshake
from prfaas.transfer.backend import (
    Peer,
)

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


_SCRATCH = threading.local()


def _scratch() -> memoryview:
    """A 1 MiB per-thread buffer that discarded bytes are read into."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None:
        buf = _SCRATCH.buf = memoryview(bytearray(1 << 20))
    return buf
