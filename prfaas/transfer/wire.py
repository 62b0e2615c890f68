"""The wire format: length-prefixed frames, the request header, layer checksums, socket I/O.

Every frame starts with ``magic(4) type(1) flags(1) reserved(2) size(8)`` (network order); ``size``
counts the payload after these 16 bytes and is checked against a per-type hard limit before anything
is read or allocated. A request is one HEADER frame (JSON + SHA-256 over it) announcing every
tensor's dtype and shape, then per layer DATA frames (tcp backend) and one COMMIT frame carrying the
layer's checksum (the header is sent before the layers are computed, so layer checksums travel with
the layers; a sender holding the whole export may also put them in the header).

Checksums are XXH3-64 (``xxhash``): memory speed (5x zlib's CRC-32 here) with the GIL released. A
layer's tensors are cut into slices of ``slice_bytes`` (per tensor, at offsets 0, S, 2S, ...); each
slice has a digest, and the layer checksum is XXH3-64 over the slices' records ``(tensor, offset,
length, digest)`` in order (``layer_checksum``). The tcp backend carries each slice's digest in its
DATA sub-header, so the receiver hashes the bytes as they land (hot in cache) and checks each slice
at once; the COMMIT carries the layer checksum and the slice size (Mooncake's receiver recomputes
the slices' digests from its buffer). Checksums guard against corruption; authenticity comes from
the HMAC handshake of every connection.
"""

from __future__ import annotations

import array
import base64
import binascii
import functools
import hashlib
import json
import socket
import struct
import sys
from dataclasses import dataclass, field

import torch
import xxhash

from prfaas.kv.layout import DTYPES, CacheLayout, dtype_name
from prfaas.kv.unit import LayerPart, TransferHeader
from prfaas.transfer.errors import ChecksumError, FrameError, LayoutMismatch, PeerClosed

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


# ---------------------------------------------------------------- tensor bytes and checksums


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's storage."""
    if t.device.type != "cpu":
        raise ValueError("tensor_bytes needs a CPU tensor")
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


_RECORD = struct.Struct("<HQQQ")  # tensor index, offset, length, digest

SliceRecord = tuple[int, int, int, int]  # tensor index, byte offset, length, XXH3-64 digest


def slice_digest(view: memoryview) -> int:
    """XXH3-64 of one slice (one-shot: the GIL is released)."""
    return xxhash.xxh3_64_intdigest(view)


def slice_records(views: list[memoryview], slice_bytes: int) -> list[SliceRecord]:
    """The records of a layer whose tensors' bytes are ``views``, cut into ``slice_bytes``."""
    return [
        (ti, off, len(v[off : off + slice_bytes]), slice_digest(v[off : off + slice_bytes]))
        for ti, v in enumerate(views)
        for off in range(0, len(v), slice_bytes)
    ]


def layer_checksum(records: list[SliceRecord]) -> int:
    """The layer checksum: XXH3-64 over its slice records, in (tensor, offset) order."""
    return xxhash.xxh3_64_intdigest(b"".join(_RECORD.pack(*r) for r in sorted(records)))


def part_checksum(tensors: list[torch.Tensor], slice_bytes: int) -> int:
    """The layer checksum of CPU tensors cut into ``slice_bytes``."""
    return layer_checksum(slice_records([tensor_bytes(t) for t in tensors], slice_bytes))


# ---------------------------------------------------------------- the header


ELEMENT_BYTES: dict[str, int] = {
    n: torch.empty((), dtype=d).element_size() for n, d in DTYPES.items()
}


@dataclass(frozen=True)
class TensorDesc:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @functools.cached_property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ELEMENT_BYTES[self.dtype]


@dataclass
class LayerDesc:
    layer: int
    kind: str
    tensors: list[TensorDesc]
    checksum: int | None = None  # the layer checksum, when the header carries it

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class WireHeader:
    """The HEADER frame's content: the request's TransferHeader plus every tensor's description."""

    stream_id: int
    header: TransferHeader
    layers: list[LayerDesc]
    version: int = FORMAT_VERSION
    offsets: list[list[int]] = field(init=False)  # per layer, per tensor: receive-buffer offset
    buffer_nbytes: int = field(init=False)  # receive-buffer size (tensors 64-B aligned)
    payload_nbytes: int = field(init=False)  # tensor bytes of all layers

    def __post_init__(self) -> None:
        self.offsets, self.buffer_nbytes = buffer_offsets(self.layers)
        self.payload_nbytes = sum(layer.nbytes for layer in self.layers)


def buffer_offsets(layers: list[LayerDesc]) -> tuple[list[list[int]], int]:
    """Offsets of every tensor in one receive buffer (each aligned to ``ALIGN``) and its size."""
    offsets, pos = [], 0
    for layer in layers:
        row = []
        for t in layer.tensors:
            row.append(pos)
            pos += (t.nbytes + ALIGN - 1) // ALIGN * ALIGN
        offsets.append(row)
    return offsets, pos


def build_wire_header(
    header: TransferHeader,
    layout: CacheLayout,
    stream_id: int,
    parts: list[LayerPart] | None = None,
    slice_bytes: int = 4 << 20,
) -> WireHeader:
    """Describe a request's cache from the layout and its token range (sender side); with
    ``parts``, the layer checksums (slices of ``slice_bytes``) go in the header too."""
    if header.num_layers != layout.num_layers or list(header.layer_kinds) != list(
        layout.layer_kinds
    ):
        raise ValueError("header layers do not match the sender's layout")
    if not 0 <= header.token_start <= header.token_end:
        raise ValueError(f"bad token range [{header.token_start}, {header.token_end})")
    n_tok = header.token_end - header.token_start
    layers = []
    for i, kind in enumerate(layout.layer_kinds):
        descs = [
            TensorDesc(name, dtype_name(spec.dtype), spec.resolve(n_tok))
            for name, spec in layout.layer_specs(i).items()
        ]
        digest = None
        if parts is not None:
            p = parts[i]
            tensors = [p.tensors[d.name].contiguous().cpu() for d in descs]
            digest = part_checksum(tensors, slice_bytes)
        layers.append(LayerDesc(i, kind, descs, digest))
    return WireHeader(stream_id, header, layers)


def encode_header(wh: WireHeader) -> bytes:
    """HEADER payload: canonical JSON followed by its SHA-256."""
    h = wh.header
    obj = {
        "version": wh.version,
        "stream_id": wh.stream_id,
        "request_id": h.request_id,
        "model_fingerprint": h.model_fingerprint,
        "num_layers": h.num_layers,
        "layer_kinds": list(h.layer_kinds),
        "token_start": h.token_start,
        "token_end": h.token_end,
        "prompt_token_ids": encode_token_ids(h.prompt_token_ids),
        "prefix_hashes": list(h.prefix_hashes),
        "meta": h.meta,
        "layers": [
            {
                "layer": ld.layer,
                "kind": ld.kind,
                "checksum": ld.checksum,
                "tensors": [[t.name, t.dtype, list(t.shape)] for t in ld.tensors],
            }
            for ld in wh.layers
        ],
    }
    try:
        body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"header is not JSON-serialisable: {e}") from e
    if len(body) + 32 > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(body)} B exceeds limit {MAX_HEADER_BYTES} B")
    return body + hashlib.sha256(body).digest()


def encode_token_ids(ids: list[int]) -> str:
    """Token ids as base64 of little-endian uint32 (a 16K-token prompt: 0.1 ms, where a JSON list
    of ints costs ~1.5 ms to encode and as much to parse); ValueError outside [0, 2**32)."""
    try:
        arr = array.array(_U32, ids)
    except OverflowError as e:
        raise ValueError(f"token ids must be in [0, 2**32): {e}") from e
    if sys.byteorder != "little":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_token_ids(v: object) -> list[int]:
    """The inverse of ``encode_token_ids``; FrameError if ``v`` is not such a string."""
    if not isinstance(v, str):
        raise FrameError("header field prompt_token_ids must be a base64 string")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FrameError(f"header field prompt_token_ids is not base64: {e}") from e
    if len(raw) % 4:
        raise FrameError("header field prompt_token_ids is not a whole number of uint32")
    arr = array.array(_U32)
    arr.frombytes(raw)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()


def _int(v: object, what: str, lo: int = 0, hi: int = 2**63) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
        raise FrameError(f"header field {what} must be an int in [{lo}, {hi}), got {v!r}")
    return v


def decode_header(payload: bytes) -> WireHeader:
    """Parse a HEADER payload; ChecksumError if its SHA-256 fails, FrameError if malformed."""
    if len(payload) < 33:
        raise FrameError(f"header payload too short ({len(payload)} B)")
    body, digest = payload[:-32], payload[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ChecksumError("header checksum mismatch")
    o = parse_json_payload(body, "header")
    try:
        kinds = o["layer_kinds"]
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise FrameError("header field layer_kinds must be a list of str")
        toks = decode_token_ids(o["prompt_token_ids"])
        hashes = o["prefix_hashes"]
        if not isinstance(hashes, list) or not set(map(type, hashes)) <= {int}:
            raise FrameError("header field prefix_hashes must be a list of int")
        if not isinstance(o["request_id"], str) or not isinstance(o["model_fingerprint"], str):
            raise FrameError("header fields request_id/model_fingerprint must be str")
        if not isinstance(o["meta"], dict):
            raise FrameError("header field meta must be an object")
        th = TransferHeader(
            request_id=o["request_id"],
            model_fingerprint=o["model_fingerprint"],
            num_layers=_int(o["num_layers"], "num_layers", 0, 1 << 16),
            layer_kinds=kinds,
            token_start=_int(o["token_start"], "token_start"),
            token_end=_int(o["token_end"], "token_end"),
            prompt_token_ids=toks,
            prefix_hashes=hashes,
            meta=o["meta"],
        )
        layers = []
        if not isinstance(o["layers"], list):
            raise FrameError("header field layers must be a list")
        for ld in o["layers"]:
            tensors = []
            for t in ld["tensors"]:
                name, dt, shape = t
                if not isinstance(name, str) or dt not in DTYPES or not isinstance(shape, list):
                    raise FrameError(f"malformed tensor description {t!r}")
                tensors.append(
                    TensorDesc(name, dt, tuple(_int(d, "shape", 0, 1 << 40) for d in shape))
                )
            digest = ld["checksum"]
            layers.append(
                LayerDesc(
                    _int(ld["layer"], "layer", 0, 1 << 16),
                    str(ld["kind"]),
                    tensors,
                    None if digest is None else _int(digest, "checksum", 0, 1 << 64),
                )
            )
        return WireHeader(
            _int(o["stream_id"], "stream_id", 0, 1 << 32), th, layers, version=o["version"]
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FrameError):
            raise
        raise FrameError(f"malformed header: {e!r}") from e


def validate_header(wh: WireHeader, layout: CacheLayout, max_request_bytes: int) -> None:
    """Check an announced cache against ``layout`` (LayoutMismatch) before any allocation."""
    h = wh.header
    if wh.version != FORMAT_VERSION:
        raise LayoutMismatch(f"wire format version {wh.version}, expected {FORMAT_VERSION}")
    if h.model_fingerprint != layout.model_fingerprint:
        raise LayoutMismatch(
            f"model fingerprint {h.model_fingerprint!r} != local {layout.model_fingerprint!r}"
        )
    if h.num_layers != layout.num_layers or len(h.layer_kinds) != layout.num_layers:
        raise LayoutMismatch(
            f"{h.num_layers} layers announced, local model has {layout.num_layers}"
        )
    if tuple(h.layer_kinds) != layout.layer_kinds:
        raise LayoutMismatch("layer kinds differ from the local model")
    if not h.token_start <= h.token_end <= layout.max_tokens:
        raise LayoutMismatch(
            f"token range [{h.token_start}, {h.token_end}) invalid (max {layout.max_tokens})"
        )
    if len(h.prompt_token_ids) != h.token_end + 1:  # the decode node computes the last token
        raise LayoutMismatch(
            f"{len(h.prompt_token_ids)} prompt tokens but token_end = {h.token_end} "
            "(expected prompt length - 1)"
        )
    if len(h.prefix_hashes) > len(h.prompt_token_ids):
        raise LayoutMismatch("more prefix hashes than tokens")
    if len(wh.layers) != layout.num_layers:
        raise LayoutMismatch(f"{len(wh.layers)} layer descriptions for {layout.num_layers} layers")
    n_tok = h.token_end - h.token_start
    for i, ld in enumerate(wh.layers):
        if ld.layer != i or ld.kind != layout.layer_kinds[i]:
            raise LayoutMismatch(f"layer description {i} is for layer {ld.layer} ({ld.kind})")
        specs = layout.layer_specs(i)
        if [t.name for t in ld.tensors] != list(specs):
            raise LayoutMismatch(
                f"layer {i} tensors {[t.name for t in ld.tensors]} != expected {list(specs)}"
            )
        for t in ld.tensors:
            spec = specs[t.name]
            if DTYPES[t.dtype] != spec.dtype:
                raise LayoutMismatch(
                    f"layer {i} {t.name}: dtype {t.dtype} != {dtype_name(spec.dtype)}"
                )
            if t.shape != spec.resolve(n_tok):
                raise LayoutMismatch(
                    f"layer {i} {t.name}: shape {t.shape} != {spec.resolve(n_tok)}"
                )
    if wh.buffer_nbytes > max_request_bytes:
        raise LayoutMismatch(
            f"request of {wh.buffer_nbytes} B exceeds the receiver limit {max_request_bytes} B"
        )
