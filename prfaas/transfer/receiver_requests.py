"""The receiver's request life cycle (``RequestAssembly``, a mixin of ``ReceiverBase``): a HEADER is
validated against the layout before the request's buffer is allocated, COMMIT frames close layers,
each complete layer is verified (inline from the slice digests for tcp, else on the verifier thread
while later layers arrive), handed to ``on_layer`` when given (a ``LayerArrival``: views of the receive buffer), and a request whose layers are all
verified is delivered; failures free the buffer and are reported once.
"""

from __future__ import annotations

import logging
import time

import torch

from prfaas.kv.layout import DTYPES
from prfaas.kv.unit import KVExport, LayerPart
from prfaas.transfer import wire
from prfaas.transfer.backend import (
    Delivery,
    LayerArrival,
    TransferFailure,
    TransferTimings,
)
from prfaas.transfer.errors import (
    CapacityError,
    ChecksumError,
    FrameError,
    LayoutMismatch,
    TransferError,
)
from prfaas.transfer.receiver_state import Assembly, ReceiverSession

log = logging.getLogger("prfaas.transfer.receiver")


class RequestAssembly:
    """Headers, commits, verification and delivery of ``ReceiverBase`` (a mixin)."""

    # --- requests
    def _on_header(self, session: ReceiverSession, payload: bytes, size: int) -> None:
        now = time.time()
        wh = wire.decode_header(payload)  # ChecksumError / FrameError: the session is unusable
        sid = wh.stream_id
        if sid <= session.max_seen:
            raise FrameError(f"stream id {sid} not increasing (last {session.max_seen})")
        rid = wh.header.request_id
        try:
            wire.validate_header(wh, self.layout, self.max_request_bytes)
            with self._lock:
                if self._inflight + wh.buffer_nbytes > self.max_inflight_bytes:
                    raise CapacityError(
                        f"{wh.buffer_nbytes} B would exceed the in-flight limit "
                        f"{self.max_inflight_bytes} B ({self._inflight} B in use)"
                    )
                self._inflight += wh.buffer_nbytes
                self._active += 1
        except (LayoutMismatch, CapacityError) as e:
            session.max_seen = sid
            self._reply(session, wire.DONE, self._done_obj(sid, e))
            self._report(TransferFailure(rid, e, session.peer))
            self._unpark(session)
            return
        buf = self._allocate(wh.buffer_nbytes)
        n_layers = len(wh.layers)
        asm = Assembly(
            wh,
            buf,
            session.peer,
            now,
            wire.FRAME_HEAD.size + size,
            received=[0] * n_layers,
            checksums=[ld.checksum for ld in wh.layers],
            records=[[] for _ in range(n_layers)],
            slice_bytes=[0] * n_layers,
            verified=[False] * n_layers,
            queued=[False] * n_layers,
            committed=[False] * n_layers,
            reserved=[0] * n_layers,
        )
        asm.view = memoryview(buf.numpy()).cast("B") if wh.buffer_nbytes else memoryview(b"")
        asm.wire_bytes = asm.header_wire_bytes
        with session.lock:
            session.streams[sid] = asm
        session.max_seen = sid
        try:
            self._on_allocated(session, asm)
        except TransferError as e:
            self._fail_stream(session, asm, e, notify=True)
        self._unpark(session)

    def _on_commit_frame(self, session: ReceiverSession, payload: bytes) -> None:
        sid, layer, nbytes, digest, slice_bytes = wire.COMMIT.unpack(payload)
        if slice_bytes == 0:
            raise FrameError("COMMIT with a zero slice size")
        if sid > session.max_seen:
            raise FrameError(f"COMMIT for unannounced stream {sid}")
        asm = session.streams.get(sid)
        if asm is None:
            return
        if layer >= len(asm.wh.layers) or nbytes != asm.wh.layers[layer].nbytes:
            raise FrameError(f"COMMIT for layer {layer} with {nbytes} B does not match the header")
        with asm.lock:
            asm.wire_bytes += wire.COMMIT_FRAME_BYTES
            if asm.committed[layer]:
                err: TransferError | None = FrameError(f"second COMMIT for layer {layer}")
            elif asm.checksums[layer] is not None and asm.checksums[layer] != digest:
                err = ChecksumError(f"layer {layer} checksum in COMMIT differs from the header's")
            else:
                err = None
                asm.checksums[layer] = digest
                asm.slice_bytes[layer] = slice_bytes
                asm.committed[layer] = True
                self._on_commit(asm, layer, nbytes)
        if err is not None:
            self._fail_stream(session, asm, err, notify=True)
            return
        self._progress(session, asm, layer)

    def _progress(self, session: ReceiverSession, asm: Assembly, layer: int) -> None:
        """Once all of ``layer``'s bytes and its COMMIT are in, verify it: here from the slice
        digests already checked (tcp), else on the verifier thread from the buffer."""
        ld = asm.wh.layers[layer]
        with asm.lock:
            if asm.done or asm.queued[layer] or asm.received[layer] != ld.nbytes:
                return
            if not asm.committed[layer]:  # the sender's COMMIT closes a layer
                return
            asm.queued[layer] = True
        if self._verifies_inline():
            self._verify(session, asm, layer)
        else:
            self._verify_q.put((session, asm, layer))

    def _verifies_inline(self) -> bool:
        """Whether the layer bytes were hashed as they were read (our DATA frames)."""
        return False

    # --- the verifier thread
    def _verify_loop(self) -> None:
        while True:
            job = self._verify_q.get()
            if job is None:
                return
            session, asm, layer = job
            try:
                self._verify(session, asm, layer)
            except Exception:  # never let the verifier die
                log.exception("verifying layer %d failed", layer)

    def _verify(self, session: ReceiverSession, asm: Assembly, layer: int) -> None:
        ld = asm.wh.layers[layer]
        with asm.lock:
            if asm.done or asm.view is None:
                return
            views = [asm.region(layer, ti) for ti in range(len(ld.tensors))]
            records = list(asm.records[layer])
        if not self._verifies_inline():  # hash the layer now, as the sender cut it
            records = wire.slice_records(views, asm.slice_bytes[layer])
        ok = wire.layer_checksum(records) == asm.checksums[layer]
        complete = False
        with asm.lock:
            if asm.done:
                return
            buf = asm.buf
            if ok:
                asm.verified[layer] = True
                asm.n_verified += 1
                complete = asm.n_verified == len(asm.wh.layers)
        if not ok:
            msg = f"request {asm.wh.header.request_id!r} layer {layer}: checksum mismatch"
            self._fail_stream(session, asm, ChecksumError(msg), notify=True)
            return
        if self.on_layer is not None and buf is not None:
            arrival = LayerArrival(asm.wh.header, _layer_part(asm.wh, buf, layer), session.peer)
            try:
                self.on_layer(arrival)
            except Exception:  # a consumer bug must not kill the transport
                log.exception("transfer layer callback failed")
        if complete:
            self._deliver(session, asm)

    def _release(self, session: ReceiverSession, asm: Assembly) -> bool:
        with asm.lock:
            if asm.done:
                return False
            asm.done = True
        with session.lock:
            session.streams.pop(asm.wh.stream_id, None)
        with self._lock:
            self._inflight -= asm.wh.buffer_nbytes
            self._active -= 1
        self._on_freed(asm)
        return True

    def _fail_stream(
        self, session: ReceiverSession, asm: Assembly, error: TransferError, notify: bool
    ) -> None:
        if not self._release(session, asm):
            return
        asm.buf, asm.view = None, None
        if notify:
            self._reply(session, wire.DONE, self._done_obj(asm.wh.stream_id, error))
        self._report(TransferFailure(asm.wh.header.request_id, error, session.peer))

    def _deliver(self, session: ReceiverSession, asm: Assembly) -> None:
        if not self._release(session, asm):
            return
        wh, buf = asm.wh, asm.buf
        assert buf is not None
        parts = [_layer_part(wh, buf, li) for li in range(len(wh.layers))]
        now = time.time()
        timings = TransferTimings(
            request_id=wh.header.request_id,
            header_at=asm.header_at,
            first_data_at=asm.first_data_at,
            last_byte_at=asm.last_byte_at or now,
            delivered_at=now,
            payload_bytes=wh.payload_nbytes,
            wire_bytes=asm.wire_bytes,
        )
        self._reply(session, wire.DONE, {"stream_id": wh.stream_id, "ok": True})
        export = KVExport(wh.header, parts)
        self._report(Delivery(export, timings, session.peer, lambda: self._recycle(buf)))

    @staticmethod
    def _done_obj(sid: int, error: TransferError) -> dict:
        return {"stream_id": sid, "ok": False, "code": error.code, "message": str(error)}


def _layer_part(wh: wire.WireHeader, buf: torch.Tensor, li: int) -> LayerPart:
    """Layer ``li`` of a request's receive buffer, its tensors as views (no copy)."""
    ld = wh.layers[li]
    tensors = {}
    for ti, td in enumerate(ld.tensors):
        off = wh.offsets[li][ti]
        tensors[td.name] = (
            buf[off : off + td.nbytes].view(DTYPES[td.dtype]).view(td.shape)
            if td.nbytes
            else torch.empty(td.shape, dtype=DTYPES[td.dtype])
        )
    return LayerPart(ld.layer, ld.kind, tensors)
