"""Our TCP backend: each layer's tensors are cut into slices spread over the peer's N connections;
slices are written straight from tensor storage (``sendmsg`` of memoryviews, by the session's I/O
thread) and read straight into the request's preallocated buffer (``recv_into``). Each slice's
XXH3-64 travels in its DATA sub-header: the sender hashes a slice just before queueing it (while
the previous one is being sent), the receiver hashes the bytes as they land and checks the slice
when it is complete; the COMMIT closing a layer carries the checksum over the slice records."""

from __future__ import annotations

import time

import torch

from prfaas.transfer import wire
from prfaas.transfer.auth import BACKEND_CODES
from prfaas.transfer.receiver import Assembly, ReceiverBase
from prfaas.transfer.sender import PeerSession, PeerStream, SenderBase


class TcpSender(SenderBase):
    """Sender over N parallel TCP connections per peer (``connections``, default: sized to the
    link)."""

    backend_code = BACKEND_CODES["tcp"]

    def _dispatch_layer(
        self, session: PeerSession, stream: PeerStream, layer: int, tensors: list[torch.Tensor]
    ) -> None:
        records: list[wire.SliceRecord] = []
        nbytes = 0
        for ti, t in enumerate(tensors):
            view = wire.tensor_bytes(t)
            nbytes += len(view)
            for off in range(0, len(view), self.slice_bytes):
                chunk = view[off : off + self.slice_bytes]
                # hashed just before it is queued: the I/O thread sends slice k while this thread
                # hashes slice k + 1, and the kernel's copy finds slice k still in cache
                digest = wire.slice_digest(chunk)
                records.append((ti, off, len(chunk), digest))
                head = wire.frame_head(wire.DATA, wire.DATA_HEAD.size + len(chunk))
                sub = wire.DATA_HEAD.pack(stream.stream_id, layer, ti, off, digest)
                # ``keep`` holds the tensor until the slice is on the wire
                session.enqueue(
                    session.next_conn(), [head + sub, chunk], stream, "data", len(chunk), keep=t
                )
        checksum = stream.wire_header.layers[layer].checksum  # in the header already
        if checksum is None:
            checksum = wire.layer_checksum(records)
        commit = wire.COMMIT.pack(stream.stream_id, layer, nbytes, checksum, self.slice_bytes)
        session.enqueue(0, [wire.frame(wire.COMMIT_T, commit)], stream, "commit", 0)


class TcpReceiver(ReceiverBase):
    """Receiver for ``TcpSender``."""

    backend_code = BACKEND_CODES["tcp"]

    def _accepts_data(self) -> bool:
        return True

    def _verifies_inline(self) -> bool:
        return True

    def _on_commit(self, asm: Assembly, layer: int, nbytes: int) -> None:
        if asm.wh.payload_nbytes == 0:
            asm.last_byte_at = time.time()
