"""Our TCP backend: each layer's tensors are cut into slices spread over the peer's N connections;
slices are sent straight from tensor storage (``sendmsg`` of a memoryview) and received straight
into the request's preallocated buffer (``recv_into``)."""

from __future__ import annotations

import socket
import threading
import time

import torch

from prfaas.transfer import wire
from prfaas.transfer.auth import BACKEND_CODES
from prfaas.transfer.errors import FrameError
from prfaas.transfer.receiver import Assembly, ReceiverBase, ReceiverSession
from prfaas.transfer.sender import PeerSession, PeerStream, SenderBase


class TcpSender(SenderBase):
    """Sender over N parallel TCP connections per peer (``connections``)."""

    backend_code = BACKEND_CODES["tcp"]

    def _dispatch_layer(
        self, session: PeerSession, stream: PeerStream, layer: int, tensors: list[torch.Tensor]
    ) -> None:
        crc = wire.part_crc32(tensors)
        nbytes = 0
        for ti, t in enumerate(tensors):
            view = wire.tensor_bytes(t)
            nbytes += len(view)
            for off in range(0, len(view), self.slice_bytes):
                chunk = view[off : off + self.slice_bytes]
                head = wire.frame_head(wire.DATA, wire.DATA_HEAD.size + len(chunk))
                sub = wire.DATA_HEAD.pack(stream.stream_id, layer, ti, off)
                # keep a reference to the tensor until the slice is on the wire
                session.enqueue(
                    session.next_conn(), [head + sub, chunk], stream, "data", len(chunk)
                )
        commit = wire.COMMIT.pack(stream.stream_id, layer, nbytes, crc)
        session.enqueue(0, [wire.frame(wire.COMMIT_T, commit)], stream, "commit", 0)


class TcpReceiver(ReceiverBase):
    """Receiver for ``TcpSender``."""

    backend_code = BACKEND_CODES["tcp"]

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._scratch = threading.local()

    def _drain(self, sock: socket.socket, n: int) -> None:
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = memoryview(bytearray(1 << 20))
        while n:
            k = min(n, len(buf))
            wire.recv_into_exact(sock, buf[:k])
            n -= k

    def _handle_data(self, session: ReceiverSession, sock: socket.socket, size: int) -> None:
        if size < wire.DATA_HEAD.size:
            raise FrameError(f"DATA frame of {size} B is shorter than its sub-header")
        sid, layer, ti, off = wire.DATA_HEAD.unpack(wire.recv_exact(sock, wire.DATA_HEAD.size))
        n = size - wire.DATA_HEAD.size
        asm = self._lookup(session, sid)
        if asm is None:  # finished or refused request: discard its remaining bytes
            self._drain(sock, n)
            return
        wh = asm.wh
        if layer >= len(wh.layers) or ti >= len(wh.layers[layer].tensors):
            raise FrameError(f"DATA for unknown layer {layer} tensor {ti} of stream {sid}")
        tnbytes = wh.layers[layer].tensors[ti].nbytes
        if off + n > tnbytes:
            raise FrameError(
                f"DATA [{off}, {off + n}) outside layer {layer} tensor {ti} of {tnbytes} B"
            )
        buf = asm.buf
        if buf is None:  # failed while we were looking it up
            self._drain(sock, n)
            return
        with asm.lock:  # book the bytes first: nothing is written past what was announced
            if asm.reserved[layer] + n > wh.layers[layer].nbytes:
                raise FrameError(f"more bytes than announced for layer {layer} of stream {sid}")
            asm.reserved[layer] += n
            if asm.first_data_at is None:
                asm.first_data_at = time.time()
        off0 = wh.offsets[layer][ti] + off
        wire.recv_into_exact(sock, memoryview(buf.numpy()).cast("B")[off0 : off0 + n])
        with asm.lock:
            asm.received[layer] += n
            asm.payload_in += n
            asm.wire_bytes += wire.DATA_OVERHEAD + n
            if asm.payload_in == wh.payload_nbytes:
                asm.last_byte_at = time.time()
        self._progress(session, asm, layer)

    def _on_commit(self, asm: Assembly, layer: int, nbytes: int) -> None:
        if asm.wh.payload_nbytes == 0:
            asm.last_byte_at = time.time()
