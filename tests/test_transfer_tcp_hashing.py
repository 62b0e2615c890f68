"""Where the tcp sender hashes its slices: by default on the session's I/O thread right before
each slice is written (the COMMIT of a layer then waits until every slice of that layer, on any
connection, was hashed), optionally on the dispatcher thread. Both must deliver identical bytes
and both must be caught by the receiver when a digest is wrong."""

from __future__ import annotations

import threading

import pytest
import torch

from prfaas.kv.layout import CacheLayout
from prfaas.kv.synthetic import random_export
from prfaas.transfer import wire
from prfaas.transfer.backend import Delivery, TransferFailure
from prfaas.transfer.errors import ChecksumError
from prfaas.transfer.registry import create_receiver, create_sender

SECRET = "cluster-secret-0123456789"
LAYOUT = CacheLayout.kimi_linear("fp-hash", ["kda", "mla", "kda", "mla"], kda_heads=2)


@pytest.fixture
def pair():
    made: list = []

    def make(**tx_kw):
        rx = create_receiver("tcp", LAYOUT, SECRET).start()
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


@pytest.mark.parametrize("on_dispatcher", [False, True])
def test_wrong_digest_is_refused(pair, monkeypatch, on_dispatcher) -> None:
    rx, tx = pair(connections=2, slice_bytes=8192, hash_on_dispatcher=on_dispatcher)
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
