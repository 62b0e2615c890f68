"""Our TCP backend: each layer's tensors are cut into slices spread over the peer's N connections;
slices are written straight from tensor storage (``sendmsg`` of memoryviews, by the session's I/O
thread) and read straight into the request's preallocated buffer (``recv_into``). The layer's
checksum is computed after its slices are queued, so it overlaps with their sending, and travels
in the COMMIT frame that closes the layer."""

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
        views = [wire.tensor_bytes(t) for t in tensors]
        for ti, view in enumerate(views):
            for off in range(0, len(view), self.slice_bytes):
                chunk = view[off : off + self.slice_bytes]
                head = wire.frame_head(wire.DATA, wire.DATA_HEAD.size + len(chunk))
                sub = wire.DATA_HEAD.pack(stream.stream_id, layer, ti, off)
                # ``keep`` holds the tensor until the slice is on the wire
                session.enqueue(
                    session.next_conn(),
                    [head + sub, chunk],
                    stream,
                    "data",
                    len(chunk),
                    keep=tensors[ti],
                )
        digest = stream.wire_header.layers[layer].checksum  # computed for the header already
        if digest is None:
            digest = wire.checksum_views(views)  # GIL released: the I/O thread sends meanwhile
        nbytes = sum(len(v) for v in views)
        commit = wire.COMMIT.pack(stream.stream_id, layer, nbytes, digest)
        session.enqueue(0, [wire.frame(wire.COMMIT_T, commit)], stream, "commit", 0)


class TcpReceiver(ReceiverBase):
    """Receiver for ``TcpSender``."""

    backend_code = BACKEND_CODES["tcp"]

    def _accepts_data(self) -> bool:
        return True

    def _on_commit(self, asm: Assembly, layer: int, nbytes: int) -> None:
        if asm.wh.payload_nbytes == 0:
            asm.last_byte_at = time.time()
