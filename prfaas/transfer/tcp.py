"""Our TCP backend: each layer's tensors are cut into slices spread over the peer's N connections;
slices are written straight from tensor storage (``sendmsg`` of memoryviews, by the session's I/O
thread) and read straight into the request's preallocated buffer (``recv_into``). Each slice's
XXH3-64 travels in its DATA sub-header: the sender's I/O thread hashes a slice right before writing
it (so the kernel's copy reads it from cache), the receiver hashes the bytes as they land and
checks the slice when it is complete; the COMMIT closing a layer carries the checksum over the
slice records and is written once every slice of the layer (on any connection) was hashed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from prfaas.transfer import wire
from prfaas.transfer.auth import BACKEND_CODES
from prfaas.transfer.receiver import Assembly, ReceiverBase
from prfaas.transfer.sender import PeerSession, PeerStream, SenderBase
from prfaas.transfer.sender_stream import QueuedFrame


class TcpSender(SenderBase):
    """Sender over N parallel TCP connections per peer (``connections``, default: sized to the
    link).

    Each slice is hashed (XXH3-64) where ``hash_on_dispatcher`` says. True: on the session's
    dispatcher thread, ahead of the I/O thread, so the hash runs on another core beside the
    writes (the bytes are read twice: once by the hash, once by the kernel's copy). False: on
    the I/O thread right before the slice is written (the copy then finds the bytes in cache,
    ~0.03 CPU s/GB less in all, but the hash is in series with the copy on the thread that
    limits a connection). The default (None) is the dispatcher wherever this process may run
    on ``SPARE_CORES`` cores or more, the I/O thread on one core. Measured: the 16-core H200
    host, one connection 0.69-0.85 -> 0.78-0.84 of a plain sendall
    (benchmarks/results/transfer_gpu_h200.md); the 2-core dev VM quiet (the sender's I/O
    thread is the limit), one connection 0.78-0.80 -> 0.93-0.95 of a plain sendall, and with
    both cores busy with other work (CPU-bound) no worse (0.59-0.63 either way)."""

    backend_code = BACKEND_CODES["tcp"]
    SPARE_CORES = 2

    def __init__(self, *args: Any, hash_on_dispatcher: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if hash_on_dispatcher is None:
            hash_on_dispatcher = usable_cores() >= self.SPARE_CORES
        self.hash_on_dispatcher = hash_on_dispatcher

    def _dispatch_layer(
        self, session: PeerSession, stream: PeerStream, layer: int, tensors: list[torch.Tensor]
    ) -> None:
        sid, size = stream.stream_id, self.slice_bytes
        digests = _LayerDigests(stream.wire_header.layers[layer].checksum)
        nbytes = 0
        for ti, t in enumerate(tensors):
            view = wire.tensor_bytes(t)
            nbytes += len(view)
            for off in range(0, len(view), size):
                chunk = view[off : off + size]
                digests.expected += 1
                prefix, prepare = _DATA_PREFIX, None
                if self.hash_on_dispatcher:
                    prefix = digests.slice_prefix(sid, layer, ti, off, chunk)
                else:  # hashed by the I/O thread when the slice's turn comes
                    prepare = digests.slice_preparer(sid, layer, ti, off, chunk)
                # ``keep`` holds the tensor until the slice is on the wire
                session.enqueue(
                    session.next_conn(),
                    [prefix, chunk],
                    stream,
                    "data",
                    len(chunk),
                    keep=t,
                    prepare=prepare,
                )

        def commit(item: QueuedFrame) -> bool:
            checksum = digests.checksum()
            if checksum is None:  # a slice on another connection is not hashed yet
                return False
            payload = wire.COMMIT.pack(sid, layer, nbytes, checksum, size)
            item.buffers = [memoryview(wire.frame(wire.COMMIT_T, payload))]
            return True

        session.enqueue(
            0, [_COMMIT_PLACEHOLDER], stream, "commit", 0, prepare=commit, blocked=digests.pending
        )


_DATA_PREFIX = bytes(wire.DATA_OVERHEAD)  # replaced by the real prefix once the slice is hashed
_COMMIT_PLACEHOLDER = bytes(wire.COMMIT_FRAME_BYTES)


class _LayerDigests:
    """One layer's slice records, filled as its slices are hashed (by default on the session's
    I/O thread, right before each is written); the COMMIT, queued behind the slices, is built
    once every record is in."""

    def __init__(self, checksum: int | None) -> None:
        self.expected = 0  # final before the COMMIT is queued
        self.records: list[wire.SliceRecord] = []
        self._checksum = checksum  # from the header, when it carries the layer checksums

    def pending(self) -> bool:
        return self._checksum is None and len(self.records) < self.expected

    def checksum(self) -> int | None:
        if self._checksum is None and len(self.records) == self.expected:
            self._checksum = wire.layer_checksum(self.records)
        return self._checksum

    def slice_prefix(self, sid: int, layer: int, ti: int, off: int, chunk: memoryview) -> bytes:
        """Hash one slice, record it, and return its DATA frame prefix (head + sub-header)."""
        digest = wire.slice_digest(chunk)
        self.records.append((ti, off, len(chunk), digest))
        head = wire.frame_head(wire.DATA, wire.DATA_HEAD.size + len(chunk))
        return head + wire.DATA_HEAD.pack(sid, layer, ti, off, digest)

    def slice_preparer(
        self, sid: int, layer: int, ti: int, off: int, chunk: memoryview
    ) -> Callable[[QueuedFrame], bool]:
        """``slice_prefix`` deferred to the I/O thread (a ``QueuedFrame.prepare``)."""

        def prepare(item: QueuedFrame) -> bool:
            item.buffers[0] = memoryview(self.slice_prefix(sid, layer, ti, off, chunk))
            return True

        return prepare


class TcpReceiver(ReceiverBase):
    """Receiver for ``TcpSender``.

    By default the I/O thread hashes each slice's bytes as they land and checks it against its
    DATA digest. ``verify_on_thread=True`` leaves hashing to the verifier thread, which checks
    each complete layer from the buffer against the COMMIT's layer checksum (as for Mooncake):
    less work on the I/O thread (for hosts with cores to spare, if one receiving thread is what
    limits a connection), a corrupt slice caught at its layer instead of on arrival, and
    ``on_layer`` called on the verifier thread."""

    backend_code = BACKEND_CODES["tcp"]

    def __init__(self, *args: Any, verify_on_thread: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verify_on_thread = verify_on_thread

    def _accepts_data(self) -> bool:
        return True

    def _verifies_inline(self) -> bool:
        return not self.verify_on_thread

    def _on_commit(self, asm: Assembly, layer: int, nbytes: int) -> None:
        if asm.wh.payload_nbytes == 0:
            asm.last_byte_at = time.time()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
