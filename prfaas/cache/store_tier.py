"""The second tier of a node's hybrid prefix cache: its cluster's Mooncake Store (host DRAM pool).

A cached MLA block or KDA/conv state checkpoint that the node's cache evicts is written to the store
under its block-hash-chain key; a later prefix match that misses in the node's cache fetches it back
instead of recomputing it.  Objects carry a header (model fingerprint, block size, dtype, shapes,
hash, CRC32 of the payload): an object that does not fit this cache is refused, never used.

Any store failure (master down, timeout, full pool) is logged and the tier turns itself off for
``retry_after_s`` (doubling on each further failure, up to 64x): the cache falls back to
recomputation.  A Mooncake client whose master is gone blocks ~4 s per call while it tries to
reconnect, so the back-off matters.
"""

from __future__ import annotations

import json
import logging
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.cache.hybrid import HybridCache

log = logging.getLogger("prfaas.cache.store_tier")

MAGIC = "prfaas-prefix-block-v1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in _DTYPES.items()}


class BadObject(ValueError):
    """A store object that does not belong to this cache (wrong model, shape, dtype or bytes)."""


class KVStore(Protocol):
    """What the tier needs of a store: bytes in, bytes out (``None``: no such object)."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...


class StoreError(RuntimeError):
    """The store did not answer (master down, RPC failure, pool full)."""


# ----- object format ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreBlockLayout:
    """Shapes and dtype of one store object: a block or a checkpoint of a hybrid cache (its header).

    Not the per-request ``prfaas.kv.CacheLayout`` a transfer is checked against."""

    fingerprint: str
    block_size: int
    dtype: str  # MLA rows and conv states; KDA states are always float32
    mla_shape: tuple[int, int, int]  # (num MLA layers, block_size, latent_dim)
    kda_shape: tuple[int, ...]  # (num KDA layers, H, D, D)
    conv_shape: tuple[int, ...]  # (num KDA layers, 3, W, kernel - 1)

    @classmethod
    def of(cls, cache: HybridCache) -> StoreBlockLayout:
        t = cache.tensors
        n_mla, n_kda = len(t.mla_kv), len(t.kda_state)
        latent = t.mla_kv[0].shape[-1] if n_mla else 0
        kda = tuple(t.kda_state[0].shape[1:]) if n_kda else ()
        conv = tuple(t.conv_state[0].shape[1:]) if n_kda else ()
        dt = t.mla_kv[0].dtype if n_mla else t.conv_state[0].dtype
        return cls(
            fingerprint=cache.model.fingerprint(),
            block_size=cache.cfg.block_size,
            dtype=_NAMES[dt],
            mla_shape=(n_mla, cache.cfg.block_size, int(latent)),
            kda_shape=(n_kda, *map(int, kda)),
            conv_shape=(n_kda, *map(int, conv)),
        )

    def key(self, h: int, kind: str) -> str:
        """Store key of the block (``kind="kv"``) or checkpoint (``"st"``) with chain hash ``h``."""
        return f"prfaas/{self.fingerprint}/b{self.block_size}/{h & 0xFFFFFFFFFFFFFFFF:016x}/{kind}"


@dataclass
class BlockObject:
    """A decoded store object: MLA rows of all MLA layers and/or the KDA/conv states."""

    h: int
    mla: torch.Tensor | None  # (n_mla, block_size, latent)
    kda: torch.Tensor | None  # (n_kda, H, D, D) float32
    conv: torch.Tensor | None  # (n_kda, 3, W, k-1)


def encode(layout: StoreBlockLayout, obj: BlockObject) -> bytes:
    """Header length (u32) + JSON header + raw tensor bytes."""
    dt = _DTYPES[layout.dtype]
    parts: list[bytes] = []
    if obj.mla is not None:
        parts.append(_raw(obj.mla, dt, layout.mla_shape))
    if (obj.kda is None) != (obj.conv is None):
        raise ValueError("a checkpoint needs both its KDA and its conv states")
    if obj.kda is not None:
        parts.append(_raw(obj.kda, torch.float32, layout.kda_shape))
        parts.append(_raw(obj.conv, dt, layout.conv_shape))
    payload = b"".join(parts)
    header = {
        "magic": MAGIC,
        "fingerprint": layout.fingerprint,
        "block_size": layout.block_size,
        "dtype": layout.dtype,
        "hash": obj.h,
        "mla": list(layout.mla_shape) if obj.mla is not None else None,
        "kda": list(layout.kda_shape) if obj.kda is not None else None,
        "conv": list(layout.conv_shape) if obj.kda is not None else None,
        "crc32": zlib.crc32(payload),
        "nbytes": len(payload),
    }
    hb = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(hb)) + hb + payload


def decode(layout: StoreBlockLayout, data: bytes, h: int) -> BlockObject:
    """Parse and check an object against this cache's layout; BadObject if it does not fit."""
    if len(data) < 4:
        raise BadObject(f"object of {len(data)} bytes has no header")
    (n,) = struct.unpack_from("<I", data)
    if n > len(data) - 4:
        raise BadObject("truncated object header")
    try:
        hd = json.loads(data[4 : 4 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadObject(f"unreadable object header: {e}") from None
    if not isinstance(hd, dict) or hd.get("magic") != MAGIC:
        raise BadObject("not a prfaas prefix-block object")
    want = {
        "fingerprint": layout.fingerprint,
        "block_size": layout.block_size,
        "dtype": layout.dtype,
        "hash": h,
    }
    for k, v in want.items():
        if hd.get(k) != v:
            raise BadObject(f"object {k} {hd.get(k)!r} does not match this cache's {v!r}")
    for k, shape in (("mla", layout.mla_shape), ("kda", layout.kda_shape)):
        if hd.get(k) is not None and tuple(hd[k]) != tuple(shape):
            raise BadObject(f"object {k} shape {hd[k]} does not match {list(shape)}")
    if hd.get("conv") is not None and tuple(hd["conv"]) != tuple(layout.conv_shape):
        raise BadObject(f"object conv shape {hd['conv']} does not match {list(layout.conv_shape)}")
    if (hd.get("kda") is None) != (hd.get("conv") is None):
        raise BadObject("object holds a KDA state without its conv state (or the reverse)")
    payload = data[4 + n :]
    if len(payload) != hd.get("nbytes") or zlib.crc32(payload) != hd.get("crc32"):
        raise BadObject("object payload is corrupt (length or CRC32 mismatch)")
    dt = _DTYPES[layout.dtype]
    off = 0
    out = BlockObject(h, None, None, None)
    if hd["mla"] is not None:
        out.mla, off = _read(payload, off, dt, layout.mla_shape)
    if hd["kda"] is not None:
        out.kda, off = _read(payload, off, torch.float32, layout.kda_shape)
        out.conv, off = _read(payload, off, dt, layout.conv_shape)
    if off != len(payload):
        raise BadObject("object payload size does not match its shapes")
    return out


def _raw(t: torch.Tensor, dt: torch.dtype, shape: tuple[int, ...]) -> bytes:
    if tuple(t.shape) != tuple(shape) or t.dtype != dt:
        raise ValueError(f"tensor {tuple(t.shape)} {t.dtype} does not match {shape} {dt}")
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def _read(
    buf: bytes, off: int, dt: torch.dtype, shape: tuple[int, ...]
) -> tuple[torch.Tensor, int]:
    n = torch.empty(shape, dtype=dt).numel() * torch.empty((), dtype=dt).element_size()
    if off + n > len(buf):
        raise BadObject("object payload shorter than its shapes")
    raw = torch.frombuffer(bytearray(buf[off : off + n]), dtype=torch.uint8)
    return raw.view(dt).reshape(shape).clone(), off + n


# ----- the tier ---------------------------------------------------------------------------------
@dataclass
class TierStats:
    blocks_put: int = 0
    states_put: int = 0
    bytes_put: int = 0
    blocks_fetched: int = 0
    states_fetched: int = 0
    bytes_fetched: int = 0
    misses: int = 0
    refused: int = 0  # objects that did not fit this cache (never used)
    failures: int = 0  # store errors (each one turns the tier off for retry_after_s)
    put_hashes: list[int] = field(default_factory=list)  # checkpoint hashes written (events)


class StoreTier:
    """Evicted blocks/checkpoints of one HybridCache to a KVStore and back."""

    def __init__(self, store: KVStore, retry_after_s: float = 5.0) -> None:
        if retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        self.store = store
        self.retry_after_s = retry_after_s
        self.stats = TierStats()
        self.layout: StoreBlockLayout | None = None
        self.cache: HybridCache | None = None
        self._off_until = 0.0
        self._consecutive = 0

    def bind(self, cache: HybridCache) -> None:
        self.cache = cache
        self.layout = StoreBlockLayout.of(cache)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._off_until

    def _failed(self, what: str, e: BaseException) -> None:
        self.stats.failures += 1
        wait = self.retry_after_s * 2 ** min(self._consecutive, 6)
        self._consecutive += 1
        self._off_until = time.monotonic() + wait
        log.warning(
            "prefix pool %s failed (%s: %s); recomputing instead for %.1f s",
            what,
            type(e).__name__,
            e,
            wait,
        )

    # ---- out: eviction ------------------------------------------------------------------------
    def _put(self, key: str, obj: BlockObject) -> bool:
        if not self.available:
            return False
        data = encode(self.layout, obj)
        try:
            self.store.put(key, data)
        except Exception as e:  # noqa: BLE001 - any store failure means: recompute later
            self._failed(f"put {key}", e)
            return False
        self._consecutive = 0
        self.stats.bytes_put += len(data)
        return True

    def on_block_evicted(self, b: int, h: int) -> None:
        """MLA block ``b`` (chain hash ``h``) leaves the node's cache: keep it in the pool, with the
        state checkpoint at that boundary when the cache still holds one."""
        c = self.cache
        mla = torch.stack([kv[b] for kv in c.tensors.mla_kv])
        kda = conv = None
        ck = c.checkpoints.lookup(h)
        if ck is not None:
            kda, conv = self._state(ck)
        if self._put(self.layout.key(h, "kv"), BlockObject(h, mla, kda, conv)):
            self.stats.blocks_put += 1
            if ck is not None:
                self.stats.states_put += 1

    def on_checkpoint_evicted(self, ck: int, h: int) -> None:
        kda, conv = self._state(ck)
        if self._put(self.layout.key(h, "st"), BlockObject(h, None, kda, conv)):
            self.stats.states_put += 1
            self.stats.put_hashes.append(h)

    def _state(self, ck: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        return (
            torch.stack([s[ck] for s in c.ckpt_state]),
            torch.stack([s[ck] for s in c.ckpt_conv]),
        )

    # ---- in: a miss in the node's cache -----------------------------------------------------
    def _get(self, h: int, kind: str) -> BlockObject | None:
        if not self.available:
            return None
        key = self.layout.key(h, kind)
        try:
            data = self.store.get(key)
        except Exception as e:  # noqa: BLE001
            self._failed(f"get {key}", e)
            return None
        self._consecutive = 0
        if not data:
            self.stats.misses += 1
            return None
        try:
            obj = decode(self.layout, data, h)
        except BadObject as e:
            self.stats.refused += 1
            log.warning("prefix pool object %s refused: %s", key, e)
            return None
        self.stats.bytes_fetched += len(data)
        return obj

    def fetch_block(self, h: int, b: int) -> bool:
        """Fill MLA block ``b`` with the pooled block of hash ``h``; False on a miss."""
        obj = self._get(h, "kv")
        if obj is None or obj.mla is None:
            return False
        for j, kv in enumerate(self.cache.tensors.mla_kv):
            kv[b].copy_(obj.mla[j])
        self.stats.blocks_fetched += 1
        return True

    def fetch_state(self, h: int, ck: int) -> bool:
        """Fill checkpoint ``ck`` with the pooled state at boundary ``h``; False on a miss."""
        obj = self._get(h, "st")
        if obj is None or obj.kda is None:
            obj = self._get(h, "kv")
        if obj is None or obj.kda is None:
            return False
        c = self.cache
        for j in range(len(c.ckpt_state)):
            c.ckpt_state[j][ck].copy_(obj.kda[j])
            c.ckpt_conv[j][ck].copy_(obj.conv[j])
        self.stats.states_fetched += 1
        return True

    # ---- publishing without eviction (a cross-cluster copy reads the pool) ------------------
    def publish(self, hashes: list[int], blocks: list[int], ck: int | None) -> int:
        """Write resident blocks (and the checkpoint at the last one) to the pool; bytes written."""
        before = self.stats.bytes_put
        for h, b in zip(hashes, blocks, strict=True):
            self.on_block_evicted(b, h)
        if ck is not None and hashes:
            self.on_checkpoint_evicted(ck, hashes[-1])
        return self.stats.bytes_put - before
