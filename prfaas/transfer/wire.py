"""The wire format: the request header, layer checksums and tensor bytes over the frames of ``frames``.

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
import struct
import sys
from dataclasses import dataclass, field

import torch
import xxhash

from prfaas.kv.layout import DTYPES, CacheLayout, dtype_name
from prfaas.kv.unit import LayerPart, TransferHeader
from prfaas.transfer.errors import ChecksumError, FrameError, LayoutMismatch
from prfaas.transfer.frames import (  # noqa: F401 (re-exported: wire.X is the public name)
    _U32,
    ABORT,
    ALIGN,
    AUTH,
    AUTH_OK,
    BUFFER,
    CHALLENGE,
    COMMIT,
    COMMIT_FRAME_BYTES,
    COMMIT_T,
    DATA,
    DATA_HEAD,
    DATA_OVERHEAD,
    DONE,
    ERROR,
    FORMAT_VERSION,
    FRAME_HEAD,
    FRAME_LIMITS,
    FRAME_NAMES,
    HEADER,
    HELLO,
    MAGIC,
    MAX_CONTROL_BYTES,
    MAX_HEADER_BYTES,
    MAX_SLICE_BYTES,
    STREAM_ID,
    error_payload,
    frame,
    frame_head,
    parse_frame_head,
    parse_json_payload,
    read_frame,
    read_small_frame,
    recv_exact,
    recv_into_exact,
    send_buffers,
    tune_socket,
)

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
