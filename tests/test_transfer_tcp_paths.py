"""The tcp backend's fast paths. Where the sender hashes its slices: by default on the session's
I/O thread right before each slice is written (the COMMIT of a layer then waits until every slice
of that layer, on any connection, was hashed), optionally on the dispatcher thread; both must
deliver identical bytes and both must be caught by the receiver when a digest is wrong, whether
the receiver checks slices as they land or (``verify_on_thread``) whole layers on its verifier
thread. Slices of 256 KiB-3 MiB and their tails arrive whole."""

from __future__ import annotations

import collections
import sys
import threading

import pytest
import torch

from prfaas.kv.layout import CacheLayout
from prfaas.kv.synthetic import random_export
from prfaas.transfer import wire
from prfaas.transfer.backend import Delivery, TransferFailure
from prfaas.transfer.errors import ChecksumError
from prfaas.transfer.registry import create_receiver, create_sender
from prfaas.transfer.sender_stream import QueuedFrame

SECRET = "cluster-secret-0123456789"
LAYOUT = CacheLayout.kimi_linear("fp-hash", ["kda", "mla", "kda", "mla"], kda_heads=2)


@pytest.fixture
def pair():
    made: list = []

    def make(rx_kw: dict | None = None, **tx_kw):
        rx = create_receiver("tcp", LAYOUT, SECRET, **(rx_kw or {})).start()
        tx = create_sender("tcp", LAYOUT, SECRET, **tx_kw)
        made.extend([tx, rx])
        return rx, tx

    yield make
    for m in made:
        m.close()


def _same(sent, got) -> None:
    assert got.header == sent.header
    for a, b in zip(sent.parts, got.parts, strict=True):
        for name, t in a.tensors.items():
            assert torch.equal(b.tensors[name].view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("on_dispatcher", [False, True])
@pytest.mark.parametrize("header_checksums", [False, True])
def test_hashing_thread_and_bytes(pair, monkeypatch, on_dispatcher, header_checksums) -> None:
    """Slices hashed where configured; 4 connections and 4 KiB slices, so every layer's COMMIT
    (connection 0) depends on slices queued on the other three."""
    rx, tx = pair(connections=4, slice_bytes=4096, hash_on_dispatcher=on_dispatcher)
    threads: set[str] = set()
    real = wire.slice_digest

    def spy(view: memoryview) -> int:
        threads.add(threading.current_thread().name)
        return real(view)

    monkeypatch.setattr(wire, "slice_digest", spy)
    ex = random_export(LAYOUT, "hashed", 0, 300, seed=4)
    stream = tx.send_export(rx.address, ex, header_checksums=header_checksums)
    stats = stream.wait(30)
    d = rx.deliveries.get(timeout=30)
    assert isinstance(d, Delivery), d
    _same(ex, d.export)
    assert stats.data_frames > 4 * len(ex.parts)  # many slices per layer, on every connection
    sender_threads = threads - {"MainThread"}  # header_checksums: computed on the caller
    assert sender_threads == {"tx-dispatch" if on_dispatcher else "tx-io"}


@pytest.mark.parametrize("on_dispatcher, on_thread", [(False, False), (True, False), (False, True)])
def test_wrong_digest_is_refused(pair, monkeypatch, on_dispatcher, on_thread) -> None:
    rx, tx = pair(
        {"verify_on_thread": on_thread},
        connections=2,
        slice_bytes=8192,
        hash_on_dispatcher=on_dispatcher,
    )
    real = wire.slice_digest
    calls = [0]

    def bad(view: memoryview) -> int:  # the 5th slice's digest is off by one bit
        calls[0] += 1
        return real(view) ^ (1 if calls[0] == 5 else 0)

    monkeypatch.setattr(wire, "slice_digest", bad)
    ex = random_export(LAYOUT, "bad", 0, 300, seed=5)
    with pytest.raises(ChecksumError):
        tx.send_export(rx.address, ex).wait(30)
    f = rx.deliveries.get(timeout=30)
    assert isinstance(f, TransferFailure) and isinstance(f.error, ChecksumError)
    assert rx.inflight_bytes == 0
    monkeypatch.setattr(wire, "slice_digest", real)
    good = random_export(LAYOUT, "good", 0, 300, seed=6)  # the session survives
    tx.send_export(rx.address, good).wait(30)
    d = rx.deliveries.get(timeout=30)
    assert isinstance(d, Delivery)
    _same(good, d.export)


@pytest.mark.parametrize("slice_kib", [256, 1024, 3072])
def test_big_slices_and_their_tails_arrive(pair, slice_kib) -> None:
    """MLA tensors of 2500 tokens (2.9 MB) in slices of 256 KiB-3 MiB: whole slices and tails of
    every size, over 1 and 3 connections."""
    for conns in (1, 3):
        rx, tx = pair(connections=conns, slice_bytes=slice_kib << 10)
        for i, (start, end) in enumerate([(0, 2500), (100, 1999), (0, 1)]):
            ex = random_export(LAYOUT, f"big-{conns}-{i}", start, end, seed=i)
            tx.send_export(rx.address, ex).wait(60)
            d = rx.deliveries.get(timeout=60)
            assert isinstance(d, Delivery), d
            _same(ex, d.export)
            d.release()


@pytest.mark.parametrize("header_checksums", [False, True])
def test_layers_verified_on_the_verifier_thread(pair, header_checksums) -> None:
    """verify_on_thread: the I/O thread hashes nothing; each layer is checked from the buffer on
    the verifier thread, where on_layer is then called; bytes identical over 3 connections."""
    layers: list[tuple[int, str]] = []
    rx, tx = pair(
        {
            "verify_on_thread": True,
            "on_layer": lambda a: layers.append((a.part.layer, threading.current_thread().name)),
        },
        connections=3,
        slice_bytes=64 << 10,
    )
    for i in range(2):
        ex = random_export(LAYOUT, f"v{i}", 0, 2000, seed=10 + i)
        tx.send_export(rx.address, ex, header_checksums=header_checksums).wait(30)
        d = rx.deliveries.get(timeout=30)
        assert isinstance(d, Delivery), d
        _same(ex, d.export)
        d.release()
    assert sorted(layers) == sorted((li, "rx-verify") for li in range(4) for _ in range(2))


def test_gathering_while_other_threads_queue(pair) -> None:
    """The I/O thread gathers and prepares (hashes, GIL released) queued frames while the
    dispatcher appends to the same queue, GIL switches forced every microsecond: no 'deque
    mutated during iteration' (the I/O thread would die and the stream hang)."""
    rx, tx = pair(connections=1, slice_bytes=128 << 10)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        exports = [random_export(LAYOUT, f"g{i}", 0, 3000 + i, seed=i) for i in range(4)]
        streams = [tx.send_export(rx.address, ex) for ex in exports]
        for st in streams:
            st.wait(60)
    finally:
        sys.setswitchinterval(old)
    got = {}
    for _ in exports:
        d = rx.deliveries.get(timeout=30)
        assert isinstance(d, Delivery), d
        got[d.export.header.request_id] = d
    for ex in exports:
        _same(ex, got[ex.header.request_id].export)


def test_gather_survives_frames_queued_meanwhile(pair) -> None:
    """Another thread may queue a frame while the I/O thread gathers the head frame's tail with
    the frames behind it (a GIL switch can fall between any two of its bytecodes, even between
    making an iterator over the queue and reading it, which then raised "deque mutated during
    iteration" and killed the I/O thread). Gathering reads the queue by index: no error, and the
    frames it takes are the head and the ones behind it, in order."""
    rx, tx = pair(connections=1)
    session = tx.session(rx.address)

    def frame(payload: bytes, started: bool = False) -> QueuedFrame:
        f = QueuedFrame([memoryview(payload)], len(payload), None, "commit", 0, None)
        f.started = started
        return f

    class Racing(collections.deque):
        """Each look at the queue lets the 'dispatcher' append a frame first."""

        def _late(self) -> None:
            deque_append(self, frame(b"late"))

        def __getitem__(self, k):  # type: ignore[no-untyped-def]
            self._late()
            return super().__getitem__(k)

        def __iter__(self):  # type: ignore[no-untyped-def]
            it = super().__iter__()
            self._late()
            return it

    deque_append = collections.deque.append
    q = Racing([frame(b"head-tail", started=True), frame(b"commit-1"), frame(b"commit-2")])
    bufs = session._gather(q)
    assert [bytes(b) for b in bufs] == [b"head-tail", b"commit-1", b"commit-2"]
    queued = list(collections.deque.__iter__(q))  # the plain iterator: appends nothing
    assert len(queued) > 3 and all(bytes(f.buffers[0]) == b"late" for f in queued[3:])
