"""Transport tests run on every backend (tcp, mooncake): real sockets on loopback, synthetic caches."""

from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from prfaas.kv.layout import CacheLayout
from prfaas.kv.synthetic import random_export
from prfaas.transfer import wire
from prfaas.transfer.auth import BACKEND_CODES, client_handshake
from prfaas.transfer.backend import Delivery, TransferFailure
from prfaas.transfer.errors import (
    AuthError,
    CapacityError,
    ChecksumError,
    FrameError,
    LayoutMismatch,
    PeerClosed,
)
from prfaas.transfer.link import LinkShaperSpec
from prfaas.transfer.receiver import ReceiverBase
from prfaas.transfer.registry import create_receiver, create_sender

SECRET = "cluster-secret-0123456789"
KINDS = ["kda", "kda", "kda", "mla"]
SMALL = CacheLayout.kimi_linear("fp-small", KINDS, kda_heads=2, max_tokens=8192)
FP32 = CacheLayout.kimi_linear(
    "fp-32", ["mla", "kda", "mla"], kda_heads=1, kv_dtype=torch.float32, conv_dtype=torch.bfloat16
)
WIDE = CacheLayout.kimi_linear("fp-wide", ["kda"] * 3 + ["mla"] * 2, kda_heads=4, kv_dim=64)


@pytest.fixture(params=["tcp", "mooncake"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make(backend: str):
    """Factory for started receivers and senders of the current backend; closes them after."""
    made: list = []

    def rx(layout: CacheLayout = SMALL, secret: str = SECRET, **kw):
        r = create_receiver(backend, layout, secret, **kw).start()
        made.append(r)
        return r

    def tx(layout: CacheLayout = SMALL, secret: str = SECRET, **kw):
        s = create_sender(backend, layout, secret, **kw)
        made.append(s)
        return s

    yield rx, tx
    for m in reversed(made):
        m.close()


@pytest.fixture
def alloc_count(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts receive-buffer allocations."""
    count = [0]
    real = ReceiverBase._allocate

    def spy(self: ReceiverBase, n: int) -> torch.Tensor:
        count[0] += 1
        return real(self, n)

    monkeypatch.setattr(ReceiverBase, "_allocate", spy)
    return count


def _get(rx, timeout: float = 15.0):
    return rx.deliveries.get(timeout=timeout)


def _assert_same(sent, got) -> None:
    assert got.header == sent.header
    assert len(got.parts) == len(sent.parts)
    for a, b in zip(sent.parts, got.parts, strict=True):
        assert (a.layer, a.kind) == (b.layer, b.kind)
        assert list(a.tensors) == list(b.tensors)
        for name, t in a.tensors.items():
            u = b.tensors[name]
            assert u.dtype == t.dtype and u.shape == t.shape
            assert torch.equal(u.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))


# ---------------------------------------------------------------- correct transfers


@pytest.mark.parametrize(
    "layout, start, end, order",
    [
        (SMALL, 0, 700, "forward"),
        (SMALL, 512, 1500, "reverse"),
        (SMALL, 300, 300, "forward"),  # full prefix hit: no MLA bytes at all
        (FP32, 5, 900, "forward"),
        (WIDE, 0, 4000, "reverse"),
    ],
)
def test_bytes_identical_streaming(make, layout, start, end, order) -> None:
    rx_f, tx_f = make
    rx = rx_f(layout)
    tx = tx_f(layout, connections=3, slice_bytes=64 << 10)
    ex = random_export(layout, f"req-{start}-{end}", start, end, seed=start + end)
    stream = tx.open(rx.address, ex.header)
    parts = ex.parts if order == "forward" else ex.parts[::-1]
    for p in parts:
        stream.send(p)
    stream.finish()
    stats = stream.wait(15)
    d = _get(rx)
    assert isinstance(d, Delivery), d
    _assert_same(ex, d.export)
    t = d.timings
    assert t.payload_bytes == ex.nbytes() == stats.payload_bytes
    assert t.header_at <= t.first_data_at <= t.last_byte_at <= t.delivered_at
    assert stats.opened_at <= stats.finished_at <= stats.last_byte_sent_at <= stats.acked_at
    assert rx.inflight_bytes == 0 and rx.active_streams == 0


def test_many_requests_interleaved(make) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=4, slice_bytes=16 << 10)
    exports = [random_export(SMALL, f"r{i}", 100 * i, 600 + 50 * i, seed=i) for i in range(4)]
    streams = [tx.open(rx.address, ex.header) for ex in exports]
    for layer in range(SMALL.num_layers):  # layer-wise, all requests at once
        for ex, st in zip(exports, streams, strict=True):
            st.send(ex.parts[layer])
    for st in streams:
        st.finish()
    for st in streams:
        st.wait(15)
    got = {}
    for _ in exports:
        d = _get(rx)
        assert isinstance(d, Delivery), d
        got[d.export.header.request_id] = d.export
    for ex in exports:
        _assert_same(ex, got[ex.header.request_id])


def test_concurrent_opens_from_many_threads(make) -> None:
    """Stream ids reach the receiver in order even when threads open streams at once."""
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2)
    exports = [random_export(SMALL, f"c{i}", 0, 64 + i, seed=i) for i in range(16)]
    barrier = threading.Barrier(len(exports))
    errors: list[BaseException] = []

    def send(ex) -> None:
        try:
            barrier.wait()
            tx.send_export(rx.address, ex).wait(15)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(ex,)) for ex in exports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    got = {}
    for _ in exports:
        d = _get(rx)
        assert isinstance(d, Delivery), d
        got[d.export.header.request_id] = d.export
    for ex in exports:
        _assert_same(ex, got[ex.header.request_id])


def test_only_given_parts_are_sent(make, backend) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2, slice_bytes=64 << 10)
    ex = random_export(SMALL, "tail-only", 512, 700, seed=9)
    stream = tx.send_export(rx.address, ex)
    stats = stream.wait(15)
    d = _get(rx)
    assert isinstance(d, Delivery)
    # 3 KDA layers x (2x128x128 fp32 state + 3x256x3 fp32 conv) + 188 uncached tokens x 576 bf16
    assert stats.payload_bytes == 3 * (131_072 + 9_216) + 188 * 1_152 == 637_440
    assert stats.header_bytes == 16 + len(wire.encode_header(stream.wire_header))
    assert stats.commit_frames == 4
    assert (
        stats.framing_bytes
        == stats.data_frames * wire.DATA_OVERHEAD + stats.commit_frames * wire.COMMIT_FRAME_BYTES
    )
    if backend == "tcp":
        # 64 KiB slices: state 2 each, conv 1 each, kv 216,576 B -> 4
        assert stats.data_frames == 3 * (2 + 1) + 4
        assert stats.bulk_bytes == 0
    else:
        assert stats.data_frames == 0 and stats.bulk_bytes == 637_440
    assert stats.total_bytes == stats.header_bytes + 637_440 + stats.framing_bytes
    assert d.timings.wire_bytes == stats.socket_bytes
    snap = tx.snapshot(rx.address)
    assert snap.bytes_total == stats.total_bytes
    deadline = time.monotonic() + 5
    while snap.bytes_in_flight and time.monotonic() < deadline:  # TIOCOUTQ counts unacked bytes
        time.sleep(0.01)
        snap = tx.snapshot(rx.address)
    assert snap.bytes_in_flight == 0


def test_shaped_link_200mbps(make) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2, link=LinkShaperSpec(gbps=0.2))
    ex = random_export(SMALL, "shaped", 0, 5000, seed=2)  # ~6.2 MB
    stream = tx.send_export(rx.address, ex)
    stats = stream.wait(30)
    d = _get(rx)
    assert isinstance(d, Delivery)
    expected = stats.total_bytes * 8 / 0.2e9
    elapsed = d.timings.last_byte_at - stats.opened_at
    assert expected == pytest.approx(0.247, rel=0.02)
    assert abs(elapsed - expected) <= 0.15 * expected, (elapsed, expected)
    snap = tx.snapshot(rx.address)
    assert snap.capacity_gbps == 0.2


def test_shaped_link_rtt_adds_one_way_delay(make, backend) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2, link=LinkShaperSpec(gbps=0.5, rtt_ms=200.0))
    ex = random_export(SMALL, "far", 0, 10, seed=3)  # ~0.43 MB: 7 ms at 0.5 Gbps
    tx.send_export(rx.address, ex).wait(30)  # warm: connections and Mooncake segment set up
    _get(rx).release()
    stream = tx.send_export(rx.address, ex)
    stats = stream.wait(30)
    d = _get(rx)
    assert isinstance(d, Delivery)
    # tcp: serialisation + RTT/2. mooncake: the header, the BUFFER reply (address of the
    # registered buffer), the bulk write and the COMMIT each cross the link once: 2 RTT
    one_way = 1 if backend == "tcp" else 4
    expected = stats.total_bytes * 8 / 0.5e9 + 0.100 * one_way
    assert d.timings.header_at - stats.opened_at >= 0.100
    # lower bounds only (bytes must never arrive before the emulated link allows them); the
    # one accuracy test with a tolerance is the 200 Mbps one above
    assert d.timings.last_byte_at - stats.opened_at >= expected - 0.002
    assert stats.acked_at - d.timings.delivered_at >= 0.100 - 0.002  # the ack travels back
    assert tx.snapshot(rx.address).rtt_ms >= 200.0


def test_send_does_not_wait_for_the_network(make) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2, link=LinkShaperSpec(gbps=0.02))  # 20 Mbps: ~0.2 s for this request
    ex = random_export(SMALL, "slow-link", 0, 100, seed=8)
    stream = tx.send_export(rx.address, ex)  # every layer handed over
    snap = tx.snapshot(rx.address)
    assert not stream.done
    assert snap.bytes_in_flight > ex.nbytes() // 2  # still queued behind the link
    stream.wait(30)
    assert isinstance(_get(rx), Delivery)


# ---------------------------------------------------------------- refusals


def test_corrupted_checksum(make, monkeypatch: pytest.MonkeyPatch) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f()
    real = wire.slice_digest
    # the sender's checksums are off by one bit; the receiver's verifier computes true ones
    monkeypatch.setattr(
        wire,
        "slice_digest",
        lambda v: real(v) ^ (0 if threading.current_thread().name == "rx-verify" else 0x10),
    )
    ex = random_export(SMALL, "bad", 0, 400)
    stream = tx.open(rx.address, ex.header)
    for p in ex.parts:
        stream.send(p)
    stream.finish()
    with pytest.raises(ChecksumError):
        stream.wait(15)
    f = _get(rx)
    assert isinstance(f, TransferFailure) and isinstance(f.error, ChecksumError)
    assert f.request_id == "bad"
    assert rx.inflight_bytes == 0 and rx.active_streams == 0
    assert rx.deliveries.empty()
    monkeypatch.setattr(wire, "slice_digest", real)
    good = random_export(SMALL, "good", 0, 400, seed=5)  # the session survives
    tx.send_export(rx.address, good).wait(15)
    d = _get(rx)
    assert isinstance(d, Delivery)
    _assert_same(good, d.export)


def test_layers_handed_out_as_they_land(make, backend) -> None:
    """With ``on_layer`` each verified layer is handed out as soon as it is in (before later
    layers are even sent), as views of the receive buffer with the sent bytes; the delivery
    follows the last one. A layer that fails its checksum is never handed out."""
    rx_f, tx_f = make
    landed: list = []
    rx = rx_f(on_layer=landed.append)
    tx = tx_f(connections=2, slice_bytes=64 << 10)
    ex = random_export(SMALL, "lw", 0, 1500, seed=11)
    stream = tx.open(rx.address, ex.header)
    for i, p in enumerate(ex.parts):
        stream.send(p)
        deadline = time.monotonic() + 15
        while len(landed) <= i and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [a.part.layer for a in landed] == list(range(i + 1))  # in before the next is sent
        assert rx.deliveries.empty() or i == len(ex.parts) - 1  # delivered after the last one
    stream.finish()
    stream.wait(15)
    d = _get(rx)
    assert isinstance(d, Delivery)
    for a, sent in zip(landed, ex.parts, strict=True):
        assert a.header.request_id == "lw" and a.part.kind == sent.kind
        for name, t in sent.tensors.items():
            assert torch.equal(a.part.tensors[name].view(torch.uint8), t.view(torch.uint8))
    _assert_same(ex, d.export)
    d.release()
    if backend != "tcp":  # mooncake's bulk bytes do not cross our socket
        return
    proxy = FlipProxy(rx.address, at=200_000)  # a flipped payload byte: that layer never lands
    tx2 = tx_f(connections=1)
    landed.clear()
    with pytest.raises(ChecksumError):
        tx2.send_export(proxy.address, random_export(SMALL, "flip", 0, 1500, seed=12)).wait(15)
    f = _get(rx)
    assert isinstance(f, TransferFailure) and f.request_id == "flip"
    flipped = {a.part.layer for a in landed}
    assert len(flipped) < len(SMALL.layer_kinds)


class FlipProxy:
    """A TCP proxy that flips one byte of the client->server stream at offset ``at``."""

    def __init__(self, upstream: tuple[str, int], at: int) -> None:
        self.upstream, self.at = upstream, at
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.address = self.ls.getsockname()
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, flip: bool) -> None:
        pos = 0
        try:
            while data := a.recv(1 << 16):
                if flip and pos <= self.at < pos + len(data):
                    buf = bytearray(data)
                    buf[self.at - pos] ^= 0x01
                    data = bytes(buf)
                pos += len(data)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        c, _ = self.ls.accept()
        u = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()


def test_tcp_corrupted_in_flight(backend, make) -> None:
    if backend != "tcp":
        pytest.skip("bulk bytes of mooncake do not cross our socket")
    rx_f, tx_f = make
    rx = rx_f()
    proxy = FlipProxy(rx.address, at=200_000)  # well past handshake and header: payload
    tx = tx_f(connections=1)
    ex = random_export(SMALL, "flipped", 0, 400)
    stream = tx.send_export(proxy.address, ex)
    with pytest.raises(ChecksumError, match="checksum"):
        stream.wait(15)
    f = _get(rx)
    assert isinstance(f, TransferFailure) and isinstance(f.error, ChecksumError)
    assert rx.inflight_bytes == 0


def test_wrong_secret_refused_both_sides(make, alloc_count) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(secret="another-secret-9876543210")
    ex = random_export(SMALL, "intruder", 0, 100)
    with pytest.raises(AuthError):
        tx.open(rx.address, ex.header)
    f = _get(rx)
    assert isinstance(f, TransferFailure) and isinstance(f.error, AuthError)
    assert alloc_count[0] == 0


def _raw_client(rx, backend: str, auth: bool = True) -> socket.socket:
    s = socket.create_connection(rx.address)
    if auth:
        client_handshake(s, SECRET.encode(), BACKEND_CODES[backend], b"r" * 16, 0, 1)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    "auth, head",
    [
        (False, wire.FRAME_HEAD.pack(wire.MAGIC, wire.HELLO, 0, 0, 1 << 30)),  # before auth
        (True, wire.FRAME_HEAD.pack(wire.MAGIC, wire.DATA, 0, 0, 1 << 40)),
        (True, wire.FRAME_HEAD.pack(wire.MAGIC, wire.HEADER, 0, 0, wire.MAX_HEADER_BYTES + 1)),
        (True, b"HTTP" + wire.FRAME_HEAD.pack(wire.MAGIC, wire.HEADER, 0, 0, 10)[4:]),
        (True, wire.FRAME_HEAD.pack(wire.MAGIC, wire.AUTH, 0, 0, 32)),  # unexpected type
    ],
)
def test_bad_frame_refused_before_allocation(make, backend, alloc_count, auth, head) -> None:
    rx_f, _ = make
    rx = rx_f()
    s = _raw_client(rx, backend, auth)
    s.sendall(head)
    f = _get(rx)
    assert isinstance(f, TransferFailure) and isinstance(f.error, FrameError), f
    assert _closed_by_peer(s)
    assert alloc_count[0] == 0 and rx.inflight_bytes == 0
    s.close()


def test_malformed_and_truncated_header(make, backend, alloc_count) -> None:
    rx_f, _ = make
    rx = rx_f()
    import hashlib

    body = b'{"not": "a header"}'
    s = _raw_client(rx, backend)
    s.sendall(wire.frame(wire.HEADER, body + hashlib.sha256(body).digest()))
    f = _get(rx)
    assert isinstance(f.error, FrameError)
    s.close()
    s = _raw_client(rx, backend)
    s.sendall(wire.frame_head(wire.HEADER, 1000) + b"x" * 10)
    s.close()
    f = _get(rx)
    assert isinstance(f.error, PeerClosed) and "10 of 1000" in str(f.error)
    assert alloc_count[0] == 0


def test_data_before_header_is_refused(make, backend, alloc_count) -> None:
    if backend != "tcp":
        pytest.skip("DATA frames are a tcp-backend frame")
    rx_f, _ = make
    rx = rx_f(header_wait_s=0.2)
    s = _raw_client(rx, backend)
    sub = wire.DATA_HEAD.pack(7, 0, 0, 0, 0)
    s.sendall(wire.frame_head(wire.DATA, len(sub) + 8) + sub + b"x" * 8)
    f = _get(rx)
    assert isinstance(f.error, FrameError) and "unannounced" in str(f.error)
    assert alloc_count[0] == 0


def test_layout_mismatch_refused(make, alloc_count) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    other = CacheLayout.kimi_linear("other-model", KINDS, kda_heads=2, max_tokens=8192)
    tx = tx_f(other)
    ex = random_export(other, "wrong-model", 0, 300)
    stream = tx.send_export(rx.address, ex)
    with pytest.raises(LayoutMismatch, match="fingerprint"):
        stream.wait(15)
    f = _get(rx)
    assert isinstance(f.error, LayoutMismatch) and f.request_id == "wrong-model"
    assert alloc_count[0] == 0


def test_refused_request_does_not_break_session(make, alloc_count) -> None:
    rx_f, tx_f = make
    rx = rx_f(CacheLayout.kimi_linear("fp-small", KINDS, kda_heads=2, max_tokens=500))
    tx = tx_f(connections=2, slice_bytes=16 << 10)
    too_long = random_export(SMALL, "too-long", 0, 700)
    st = tx.send_export(rx.address, too_long)
    with pytest.raises(LayoutMismatch, match="token range"):
        st.wait(15)
    ok = random_export(SMALL, "fits", 0, 450, seed=4)
    tx.send_export(rx.address, ok).wait(15)
    f, d = _get(rx), _get(rx)
    assert isinstance(f, TransferFailure) and f.request_id == "too-long"
    assert isinstance(d, Delivery)
    _assert_same(ok, d.export)
    assert alloc_count[0] == 1


def test_capacity_limit(make, alloc_count) -> None:
    rx_f, tx_f = make
    rx = rx_f(max_inflight_bytes=100_000)
    tx = tx_f()
    st = tx.send_export(rx.address, random_export(SMALL, "big", 0, 10))
    with pytest.raises(CapacityError):
        st.wait(15)
    assert isinstance(_get(rx).error, CapacityError)
    assert alloc_count[0] == 0


def test_sender_api_misuse(make) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f()
    ex = random_export(SMALL, "misuse", 0, 100)
    st = tx.open(rx.address, ex.header)
    with pytest.raises(ValueError, match="missing"):
        st.finish()
    bad = random_export(SMALL, "x", 0, 101).parts[3]
    with pytest.raises(ValueError, match="header says"):
        st.send(bad)
    st.send(ex.parts[0])
    with pytest.raises(ValueError, match="already sent"):
        st.send(ex.parts[0])
    with pytest.raises(ValueError, match="is kda"):
        st.send(type(ex.parts[1])(1, "mla", ex.parts[1].tensors))
    deadline = time.monotonic() + 10
    while rx.inflight_bytes == 0:  # the receiver holds a buffer for it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    st.abort("engine failed")
    f = _get(rx)
    assert f.request_id == "misuse" and f.error.code == "aborted"
    assert rx.inflight_bytes == 0
    with pytest.raises(ValueError, match="connections"):
        tx_f(connections=0)


def test_receiver_gone_mid_transfer(make) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2, link=LinkShaperSpec(gbps=0.02))  # ~0.2 s: still sending when rx closes
    stream = tx.send_export(rx.address, random_export(SMALL, "orphan", 0, 100))
    deadline = time.monotonic() + 10
    while rx.inflight_bytes == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rx.close()
    with pytest.raises(PeerClosed):
        stream.wait(15)
    f = _get(rx)
    assert isinstance(f, TransferFailure) and f.request_id == "orphan"
    assert rx.inflight_bytes == 0


# ---------------------------------------------------------------- a sender process dies


SENDER_SCRIPT = f"""
import sys
from prfaas.transfer.registry import create_sender
from prfaas.kv.layout import CacheLayout
from prfaas.transfer.link import LinkShaperSpec
from prfaas.kv.synthetic import random_export
backend, port = sys.argv[1], int(sys.argv[2])
lay = CacheLayout.kimi_linear("fp-small", ["kda", "kda", "kda", "mla"], kda_heads=2, max_tokens=65536)
tx = create_sender(backend, lay, {SECRET!r}, connections=2, link=LinkShaperSpec(gbps=0.05))
ex = random_export(lay, "victim", 0, 20000, seed=1)
stream = tx.send_export(("127.0.0.1", port), ex)
print("SENDING", flush=True)
stream.wait(120)
"""


def test_sender_process_killed_mid_transfer(make, backend) -> None:
    rx_f, _ = make
    lay = CacheLayout.kimi_linear("fp-small", KINDS, kda_heads=2, max_tokens=65536)
    rx = rx_f(lay)
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER_SCRIPT, backend, str(rx.address[1])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while rx.inflight_bytes == 0:  # header accepted, buffer allocated, layers flowing
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.5)  # ~3 MB of ~23 MB in at 50 Mbps
        assert rx.deliveries.empty()
        proc.kill()
        proc.wait(10)
        f = _get(rx)
        assert isinstance(f, TransferFailure) and f.request_id == "victim"
        assert isinstance(f.error, PeerClosed)
        assert rx.inflight_bytes == 0 and rx.active_streams == 0
        if backend == "mooncake":
            assert rx.registered == set()
        time.sleep(0.2)
        assert rx.deliveries.empty()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert math.isfinite(time.monotonic())


# ---------------------------------------------------------------- buffer reuse, header checksums


def test_released_buffer_is_reused(make) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f(connections=2, slice_bytes=32 << 10)
    first = random_export(SMALL, "first", 0, 600, seed=1)
    tx.send_export(rx.address, first).wait(15)
    d1 = _get(rx)
    _assert_same(first, d1.export)
    ptr = d1.export.parts[0].tensors["state"].data_ptr()
    assert rx.pooled_bytes == 0
    d1.release()
    assert rx.pooled_bytes > 0
    second = random_export(SMALL, "second", 0, 550, seed=2)  # smaller: fits the released buffer
    tx.send_export(rx.address, second, header_checksums=True).wait(15)
    d2 = _get(rx)
    assert isinstance(d2, Delivery)
    _assert_same(second, d2.export)
    assert d2.export.parts[0].tensors["state"].data_ptr() == ptr
    assert rx.pooled_bytes == 0


def test_best_fit_among_several_released_buffers(make) -> None:
    """With several buffers pooled, the smallest that fits is taken (picking one out of the pool
    once compared tensors elementwise and failed)."""
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f()
    ptrs, held = {}, []
    for name, n in (("a", 600), ("b", 300), ("c", 450)):  # all held: three buffers
        tx.send_export(rx.address, random_export(SMALL, name, 0, n, seed=n)).wait(15)
        held.append(_get(rx))
        ptrs[name] = held[-1].export.parts[0].tensors["state"].data_ptr()
    for d in held:
        d.release()
    assert len(set(ptrs.values())) == 3 and rx.pooled_bytes > 0
    again = random_export(SMALL, "again", 0, 420, seed=9)  # fits c (450) and a (600): c is smaller
    tx.send_export(rx.address, again).wait(15)
    d = _get(rx)
    _assert_same(again, d.export)
    assert d.export.parts[0].tensors["state"].data_ptr() == ptrs["c"]


def test_sender_staging_pool_takes_the_best_fit() -> None:
    """The sender's pinned staging pool (GPU parts) picks the smallest buffer that fits out of
    several (plain CPU tensors stand in for pinned ones here)."""
    tx = create_sender("tcp", SMALL, SECRET)
    try:
        bufs = [torch.empty(n, dtype=torch.uint8) for n in (1000, 600, 500)]
        for b in bufs:
            tx._give_pinned(b)
        assert tx._take_pinned(450) is bufs[2]
        assert tx._take_pinned(450) is bufs[1]
        assert tx._take_pinned(900) is bufs[0]
    finally:
        tx.close()


def test_header_checksum_disagreeing_with_commit(make, monkeypatch: pytest.MonkeyPatch) -> None:
    rx_f, tx_f = make
    rx = rx_f()
    tx = tx_f()
    real = wire.build_wire_header

    def tampered(*args, **kwargs):
        wh = real(*args, **kwargs)
        wh.layers[2].checksum ^= 1  # header and COMMIT now disagree for layer 2
        return wh

    monkeypatch.setattr(wire, "build_wire_header", tampered)
    st = tx.send_export(rx.address, random_export(SMALL, "hdr-crc", 0, 200), header_checksums=True)
    with pytest.raises(ChecksumError, match="layer 2"):
        st.wait(15)
    assert isinstance(_get(rx).error, ChecksumError)
    assert rx.inflight_bytes == 0


# ---------------------------------------------------------------- replays, truncation, limits


class RecordingProxy:
    """A TCP proxy that records the client->server bytes of its first connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent = bytearray()
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.address = self.ls.getsockname()
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, record: bool) -> None:
        try:
            while data := a.recv(1 << 16):
                if record:
                    self.sent += data
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        c, _ = self.ls.accept()
        u = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()


def test_replayed_transfer_is_refused(backend, make, alloc_count) -> None:
    """Bytes recorded from a good transfer, replayed on a new connection, fail the handshake
    (the server's challenge is fresh) before any request is read."""
    if backend != "tcp":
        pytest.skip("the layer bytes of mooncake do not cross our socket")
    rx_f, tx_f = make
    rx = rx_f()
    proxy = RecordingProxy(rx.address)
    tx = tx_f(connections=1)
    ex = random_export(SMALL, "original", 0, 300)
    tx.send_export(proxy.address, ex).wait(15)
    assert isinstance(_get(rx), Delivery)
    assert alloc_count[0] == 1
    s = socket.create_connection(rx.address)
    s.sendall(bytes(proxy.sent))
    f = _get(rx)
    assert isinstance(f, TransferFailure) and isinstance(f.error, AuthError)
    s.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        while s.recv(1 << 16):  # the challenge, the refusal, then the close
            pass
    s.close()
    assert alloc_count[0] == 1 and rx.inflight_bytes == 0


def test_replayed_stream_id_is_refused(backend, make) -> None:
    """A HEADER whose stream id was already used in the session ends the session."""
    rx_f, _ = make
    rx = rx_f()
    ex = random_export(SMALL, "twice", 0, 100)
    payload = wire.encode_header(wire.build_wire_header(ex.header, SMALL, 1))
    s = _raw_client(rx, backend)
    s.sendall(wire.frame(wire.HEADER, payload))
    s.sendall(wire.frame(wire.HEADER, payload))
    f = _get(rx)
    assert isinstance(f, TransferFailure) and f.request_id == "twice"
    assert "not increasing" in str(f.error)
    assert rx.inflight_bytes == 0
    s.close()


def test_truncated_layer_is_refused(backend, make) -> None:
    """A sender that goes away in the middle of a DATA frame: the request fails, nothing is
    delivered, the buffer is freed."""
    if backend != "tcp":
        pytest.skip("DATA frames are a tcp-backend frame")
    rx_f, _ = make
    rx = rx_f()
    ex = random_export(SMALL, "cut", 0, 100)
    payload = wire.encode_header(wire.build_wire_header(ex.header, SMALL, 1))
    s = _raw_client(rx, backend)
    s.sendall(wire.frame(wire.HEADER, payload))
    sub = wire.DATA_HEAD.pack(1, 0, 0, 0, 0)
    s.sendall(wire.frame_head(wire.DATA, len(sub) + 1000) + sub + b"x" * 10)
    time.sleep(0.2)
    s.close()
    f = _get(rx)
    assert isinstance(f, TransferFailure) and f.request_id == "cut"
    assert isinstance(f.error, PeerClosed)
    assert rx.inflight_bytes == 0 and rx.active_streams == 0
    assert rx.deliveries.empty()


def test_idle_connections_cost_no_threads_and_are_capped(backend, make) -> None:
    """300 connections that never authenticate: no thread per connection, at most
    ``max_connections`` held, all closed after the handshake timeout."""
    rx_f, _ = make
    rx = rx_f(max_connections=100, handshake_timeout_s=2.0)
    before = threading.active_count()
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(rx.address))
            assert rx.connection_count <= 100
        deadline = time.monotonic() + 30
        while rx.refused_connections + rx.timed_out_connections < 300:
            assert time.monotonic() < deadline, (rx.refused_connections, rx.timed_out_connections)
            assert rx.connection_count <= 100
            assert threading.active_count() <= before + 2
            time.sleep(0.05)
        assert rx.refused_connections >= 100 and rx.connection_count == 0
    finally:
        for s in socks:
            s.close()


def test_idle_session_is_closed_and_the_sender_reconnects(make) -> None:
    rx_f, tx_f = make
    rx = rx_f(idle_timeout_s=0.5)
    tx = tx_f(connections=2)
    first = random_export(SMALL, "before", 0, 200, seed=1)
    tx.send_export(rx.address, first).wait(15)
    _get(rx).release()
    deadline = time.monotonic() + 20
    while rx.connection_count:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    old = tx.session(rx.address)
    while old.error is None:  # the sender noticed the close
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = random_export(SMALL, "after", 0, 200, seed=2)
    tx.send_export(rx.address, again).wait(15)
    d = _get(rx)
    assert isinstance(d, Delivery)
    _assert_same(again, d.export)


def test_connections_sized_to_the_link() -> None:
    from prfaas.transfer.sender import MAX_CONNECTIONS, connections_for_link

    four_mb = 4 << 20
    assert connections_for_link(10.0, 20.0, four_mb) == 6  # 25 MB in flight / 4 MiB
    assert connections_for_link(1.0, 0.1, four_mb) == 1
    assert connections_for_link(100.0, 50.0, four_mb) == MAX_CONNECTIONS
    assert connections_for_link(None, 1.0, four_mb) == 3  # unknown rate: 100 Gbps
