"""Frames on the transfer wire, torch-free: the 16-byte frame prefix, per-type size limits, frame
types, and the blocking socket helpers that read and write them (``wire`` adds the request header and
tensors on top). The handshake (``auth``) needs only this module, so processes that check a secret or
speak the handshake (the launcher, the gateway) never import torch.

Every frame starts with ``magic(4) type(1) flags(1) reserved(2) size(8)`` (network order); ``size``
counts the payload after these 16 bytes and is checked against a per-type hard limit before anything
is read or allocated.
"""

from __future__ import annotations

import array
import json
import socket
import struct

from prfaas.transfer.errors import FrameError, PeerClosed

FORMAT_VERSION = 3  # 3: prompt token ids as base64 uint32; 2: XXH3-64 checksums (1: CRC-32)
MAGIC = b"PFKV"
FRAME_HEAD = struct.Struct("!4sBBHQ")  # magic, type, flags, reserved, payload size
DATA_HEAD = struct.Struct("!IHHQQ")  # stream id, layer, tensor index, byte offset, slice XXH3-64
COMMIT = struct.Struct("!IIQQI")  # stream id, layer, layer bytes, layer checksum, slice bytes
STREAM_ID = struct.Struct("!I")
ALIGN = 64  # tensor offsets inside a receive buffer
_U32 = next(c for c in "IL" if array.array(c).itemsize == 4)  # array typecode of uint32

# frame types
HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, HEADER, DATA, COMMIT_T, ABORT, BUFFER, DONE = range(1, 12)
FRAME_NAMES = {
    HELLO: "HELLO",
    CHALLENGE: "CHALLENGE",
    AUTH: "AUTH",
    AUTH_OK: "AUTH_OK",
    ERROR: "ERROR",
    HEADER: "HEADER",
    DATA: "DATA",
    COMMIT_T: "COMMIT",
    ABORT: "ABORT",
    BUFFER: "BUFFER",
    DONE: "DONE",
}

MAX_HEADER_BYTES = 16 << 20
MAX_SLICE_BYTES = 16 << 20
MAX_CONTROL_BYTES = 4096
# hard payload-size limit per frame type
FRAME_LIMITS: dict[int, int] = {
    HELLO: 64,
    CHALLENGE: 64,
    AUTH: 32,
    AUTH_OK: 0,
    ERROR: MAX_CONTROL_BYTES,
    HEADER: MAX_HEADER_BYTES,
    DATA: DATA_HEAD.size + MAX_SLICE_BYTES,
    COMMIT_T: COMMIT.size,
    ABORT: MAX_CONTROL_BYTES,
    BUFFER: MAX_CONTROL_BYTES,
    DONE: MAX_CONTROL_BYTES,
}
DATA_OVERHEAD = FRAME_HEAD.size + DATA_HEAD.size
COMMIT_FRAME_BYTES = FRAME_HEAD.size + COMMIT.size


def frame_head(ftype: int, size: int) -> bytes:
    """The 16-byte prefix of a frame of type ``ftype`` with ``size`` payload bytes."""
    limit = FRAME_LIMITS.get(ftype)
    if limit is None:
        raise ValueError(f"unknown frame type {ftype}")
    if size > limit:
        raise ValueError(f"{FRAME_NAMES[ftype]} frame of {size} B exceeds limit {limit} B")
    return FRAME_HEAD.pack(MAGIC, ftype, 0, 0, size)


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return frame_head(ftype, len(payload)) + payload


def parse_frame_head(
    raw: bytes | bytearray | memoryview, allowed: set[int] | None = None
) -> tuple[int, int]:
    """Check magic, type, reserved bits and the size limit; return (type, size)."""
    magic, ftype, flags, reserved, size = FRAME_HEAD.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}")
    if ftype not in FRAME_LIMITS:
        raise FrameError(f"unknown frame type {ftype}")
    if allowed is not None and ftype not in allowed:
        raise FrameError(f"unexpected {FRAME_NAMES[ftype]} frame")
    if flags or reserved:
        raise FrameError(f"nonzero reserved bits in {FRAME_NAMES[ftype]} frame")
    if size > FRAME_LIMITS[ftype]:
        raise FrameError(
            f"{FRAME_NAMES[ftype]} frame of {size} B exceeds limit {FRAME_LIMITS[ftype]} B"
        )
    return ftype, size


# ---------------------------------------------------------------- socket I/O


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY, and keep-alive probes so a peer host that dies silently is noticed in ~25 s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; PeerClosed if the stream ends first."""
    got, n = 0, len(view)
    while got < n:
        try:
            r = sock.recv_into(view[got:], n - got)
        except (ConnectionError, OSError) as e:
            raise PeerClosed(f"connection lost: {e}") from e
        if r == 0:
            raise PeerClosed(f"connection closed after {got} of {n} bytes")
        got += r


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def read_frame(sock: socket.socket, allowed: set[int] | None = None) -> tuple[int, int]:
    """Read and check a frame prefix; the payload is left on the socket."""
    head = bytearray(FRAME_HEAD.size)
    recv_into_exact(sock, memoryview(head))
    return parse_frame_head(head, allowed)


def read_small_frame(sock: socket.socket, allowed: set[int]) -> tuple[int, bytes]:
    ftype, size = read_frame(sock, allowed)
    return ftype, recv_exact(sock, size)


def send_buffers(sock: socket.socket, buffers: list[bytes | memoryview]) -> int:
    """Gather-send all buffers (``sendmsg``, no joining copy); returns bytes sent."""
    bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(b) for b in bufs)
    while bufs:
        try:
            n = sock.sendmsg(bufs)
        except (ConnectionError, OSError) as e:
            raise PeerClosed(f"send failed: {e}") from e
        while n:
            if n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0
    return total


def error_payload(code: str, message: str, stream_id: int | None = None) -> bytes:
    return json.dumps({"code": code, "message": message[:2000], "stream_id": stream_id}).encode()


def parse_json_payload(payload: bytes, what: str) -> dict:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameError(f"malformed {what} payload: {e}") from e
    if not isinstance(obj, dict):
        raise FrameError(f"malformed {what} payload: not an object")
    return obj
