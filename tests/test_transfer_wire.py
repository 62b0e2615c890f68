"""Unit tests of the transfer layer's pieces: layout, frames, header codec, auth, link, monitor."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading

import pytest
import torch

from prfaas.kv.layout import TOKENS, CacheLayout, TensorSpec
from prfaas.kv.synthetic import random_export
from prfaas.transfer import wire
from prfaas.transfer.auth import check_secret, client_handshake, server_handshake
from prfaas.transfer.errors import AuthError, ChecksumError, FrameError, LayoutMismatch
from prfaas.transfer.link import LinkShaper
from prfaas.transfer.meter import LinkMeter, parse_tcp_info, read_tcp_info

SMALL = CacheLayout.kimi_linear(
    "fp-small", ["kda", "kda", "kda", "mla"], kda_heads=2, max_tokens=4096
)


# ---------------------------------------------------------------- layout


def test_kimi_48b_layout_sizes() -> None:
    lay = CacheLayout.kimi_linear_48b()
    assert lay.num_layers == 27
    assert [i + 1 for i, k in enumerate(lay.layer_kinds) if k == "mla"] == [
        4,
        8,
        12,
        16,
        20,
        24,
        27,
    ]
    assert lay.layer_specs(3)["kv"] == TensorSpec(torch.bfloat16, (TOKENS, 576))
    assert lay.layer_specs(0)["conv"].resolve(5) == (3, 4096, 3)
    # 7 x 32768 x 576 x 2 B + 20 x (32 x 128 x 128 x 4 B + 3 x 4096 x 3 x 4 B)
    assert lay.request_nbytes(32768) == 264_241_152 + 44_892_160
    assert lay.request_nbytes(0) == 44_892_160


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown layer kinds"):
        CacheLayout.kimi_linear("x", ["mla", "gqa"])
    with pytest.raises(ValueError, match="max_tokens"):
        CacheLayout.kimi_linear("x", ["mla"], max_tokens=0)
    with pytest.raises(ValueError, match="one token dimension"):
        TensorSpec(torch.float32, (TOKENS, TOKENS))
    with pytest.raises(ValueError, match="out of range"):
        SMALL.layer_specs(4)
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec(torch.complex64, (1,))


# ---------------------------------------------------------------- frames


def test_frame_roundtrip_and_refusals() -> None:
    f = wire.frame(wire.COMMIT_T, b"\0" * wire.COMMIT.size)
    assert len(f) == 16 + 28
    assert wire.parse_frame_head(f[:16]) == (wire.COMMIT_T, 28)
    with pytest.raises(FrameError, match="magic"):
        wire.parse_frame_head(b"XXXX" + f[4:16])
    with pytest.raises(FrameError, match="unknown frame type"):
        wire.parse_frame_head(wire.FRAME_HEAD.pack(wire.MAGIC, 99, 0, 0, 0))
    with pytest.raises(FrameError, match="exceeds limit"):
        wire.parse_frame_head(wire.FRAME_HEAD.pack(wire.MAGIC, wire.DATA, 0, 0, 1 << 40))
    with pytest.raises(FrameError, match="reserved"):
        wire.parse_frame_head(wire.FRAME_HEAD.pack(wire.MAGIC, wire.DATA, 1, 0, 10))
    with pytest.raises(FrameError, match="unexpected HEADER"):
        wire.parse_frame_head(wire.frame_head(wire.HEADER, 10), {wire.HELLO})
    with pytest.raises(ValueError, match="exceeds limit"):
        wire.frame_head(wire.HELLO, 65)


def test_send_buffers_gathers_partial_writes() -> None:
    a, b = socket.socketpair()
    payload = [b"abc", memoryview(bytearray(range(256)) * 4096), b"", b"xyz"]
    total = 3 + 256 * 4096 + 3
    out = bytearray()

    def reader() -> None:
        while len(out) < total:
            out.extend(b.recv(1 << 16))

    t = threading.Thread(target=reader)
    t.start()
    assert wire.send_buffers(a, payload) == total
    t.join(5)
    assert bytes(out) == b"abc" + bytes(bytearray(range(256)) * 4096) + b"xyz"
    a.close()
    b.close()


# ---------------------------------------------------------------- header


def _wire_header(layout: CacheLayout = SMALL, start: int = 100, end: int = 700):
    ex = random_export(layout, "req-1", start, end, seed=3)
    return ex, wire.build_wire_header(ex.header, layout, 5, ex.parts)


def test_header_roundtrip() -> None:
    ex, wh = _wire_header()
    back = wire.decode_header(wire.encode_header(wh))
    assert back.header == ex.header
    assert back.stream_id == 5
    assert [ld.checksum for ld in back.layers] == [
        wire.part_checksum([p.tensors[t.name] for t in ld.tensors], 4 << 20)
        for p, ld in zip(ex.parts, wh.layers, strict=True)
    ]
    assert back.layers[3].tensors[0] == wire.TensorDesc("kv", "bfloat16", (600, 576))
    assert (
        back.payload_nbytes == ex.nbytes() == 3 * (2 * 128 * 128 * 4 + 3 * 256 * 3 * 4) + 600 * 1152
    )
    wire.validate_header(back, SMALL, 1 << 30)
    # buffer offsets are 64-B aligned and cover every tensor
    flat = [o for row in back.offsets for o in row]
    assert all(o % 64 == 0 for o in flat) and flat == sorted(flat)


def test_header_corruption_and_malformed() -> None:
    _, wh = _wire_header()
    raw = bytearray(wire.encode_header(wh))
    raw[10] ^= 1
    with pytest.raises(ChecksumError, match="header checksum"):
        wire.decode_header(bytes(raw))
    body = b'{"version": 1}'
    with pytest.raises(FrameError, match="malformed header"):
        wire.decode_header(body + hashlib.sha256(body).digest())
    body = b"[1, 2"
    with pytest.raises(FrameError, match="malformed header"):
        wire.decode_header(body + hashlib.sha256(body).digest())
    with pytest.raises(FrameError, match="too short"):
        wire.decode_header(b"x")


def test_prompt_token_ids_travel_as_uint32() -> None:
    """Prompt token ids cross as base64 uint32 (format 3): exact for the whole range, refused
    outside it at encode, and a header carrying anything else is malformed."""
    ids = [0, 1, 2**31, 2**32 - 1, 151_000]
    assert wire.decode_token_ids(wire.encode_token_ids(ids)) == ids
    for bad in ([-1], [2**32]):
        with pytest.raises(ValueError, match="token ids"):
            wire.encode_token_ids(bad)
    ex, wh = _wire_header()
    obj = json.loads(wire.encode_header(wh)[:-32])
    for v, match in (([1, 2, 3], "base64 string"), ("***", "not base64"), ("AAA=", "whole")):
        body = json.dumps({**obj, "prompt_token_ids": v}).encode()
        with pytest.raises(FrameError, match=match):
            wire.decode_header(body + hashlib.sha256(body).digest())
    ex.header.prompt_token_ids = [5, -1]
    with pytest.raises(ValueError, match="token ids"):
        wire.encode_header(wire.build_wire_header(ex.header, SMALL, 1))


@pytest.mark.parametrize(
    "other, match",
    [
        (
            CacheLayout.kimi_linear("fp-other", ["kda", "kda", "kda", "mla"], kda_heads=2),
            "fingerprint",
        ),
        (
            CacheLayout.kimi_linear("fp-small", ["kda", "kda", "mla", "kda"], kda_heads=2),
            "layer kinds",
        ),
        (CacheLayout.kimi_linear("fp-small", ["kda", "kda", "kda", "mla"], kda_heads=4), "shape"),
        (
            CacheLayout.kimi_linear(
                "fp-small", ["kda", "kda", "kda", "mla"], kda_heads=2, kv_dtype=torch.float32
            ),
            "dtype",
        ),
        (
            CacheLayout.kimi_linear(
                "fp-small", ["kda", "kda", "kda", "mla"], kda_heads=2, max_tokens=500
            ),
            "token range",
        ),
        (CacheLayout.kimi_linear("fp-small", ["kda", "mla"], kda_heads=2), "layers"),
    ],
)
def test_validate_header_mismatch(other: CacheLayout, match: str) -> None:
    _, wh = _wire_header()
    with pytest.raises(LayoutMismatch, match=match):
        wire.validate_header(wh, other, 1 << 30)


def test_validate_header_size_limit_and_prompt() -> None:
    _, wh = _wire_header()
    with pytest.raises(LayoutMismatch, match="exceeds the receiver limit"):
        wire.validate_header(wh, SMALL, wh.buffer_nbytes - 1)
    wh.header.prompt_token_ids = wh.header.prompt_token_ids[:-1]
    with pytest.raises(LayoutMismatch, match="prompt tokens"):
        wire.validate_header(wh, SMALL, 1 << 30)


def test_build_header_rejects_bad_input() -> None:
    ex = random_export(SMALL, "r", 0, 10)
    ex.header.token_start = 20
    with pytest.raises(ValueError, match="token range"):
        wire.build_wire_header(ex.header, SMALL, 1)
    ex.header.token_start = 0
    ex.header.meta = {"x": object()}
    with pytest.raises(ValueError, match="JSON"):
        wire.encode_header(wire.build_wire_header(ex.header, SMALL, 1))
    other = CacheLayout.kimi_linear("fp-small", ["kda", "mla"], kda_heads=2)
    with pytest.raises(ValueError, match="layout"):
        wire.build_wire_header(ex.header, other, 1)


# ---------------------------------------------------------------- auth


def _handshake(client_secret: str, server_secret: str):
    a, b = socket.socketpair()
    result: dict = {}

    def server() -> None:
        try:
            result["hello"] = server_handshake(b, check_secret(server_secret))
        except Exception as e:  # noqa: BLE001
            result["server"] = e

    t = threading.Thread(target=server)
    t.start()
    try:
        client_handshake(a, check_secret(client_secret), 1, b"s" * 16, 2, 4)
    except Exception as e:  # noqa: BLE001
        result["client"] = e
    t.join(5)
    a.close()
    b.close()
    return result


def test_auth_mutual_ok() -> None:
    r = _handshake("a" * 20, "a" * 20)
    assert "client" not in r and "server" not in r
    h = r["hello"]
    assert (h.backend, h.session_id, h.conn_index, h.n_conns) == (1, b"s" * 16, 2, 4)


def test_auth_wrong_secret_refused_both_sides() -> None:
    r = _handshake("a" * 20, "b" * 20)
    assert isinstance(r["client"], AuthError)
    assert isinstance(r["server"], AuthError)
    assert "hello" not in r


def test_secret_too_short() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        check_secret("short")


# ---------------------------------------------------------------- link emulation


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, d: float) -> None:
        self.t += d


def test_link_constant_rate_and_rtt() -> None:
    c = FakeClock()
    link = LinkShaper(gbps=1.0, rtt_ms=20.0, clock=c, sleep=c.sleep)
    assert link.reserve(125_000_000) == pytest.approx(1000.0 + 1.0 + 0.010)
    # back-to-back: queued behind the first booking, one RTT/2 only
    assert link.reserve(62_500_000) == pytest.approx(1000.0 + 1.5 + 0.010)
    c.t = 1010.0  # idle time earns no burst credit
    assert link.reserve(125_000) == pytest.approx(1010.0 + 0.001 + 0.010)
    link.transmit(125_000)
    assert c.t == pytest.approx(1010.0 + 0.002 + 0.010)


def test_link_schedule() -> None:
    c = FakeClock()
    link = LinkShaper(schedule=[(0, 1.0), (1, 0.0), (2, 2.0)], clock=c, sleep=c.sleep)
    assert link.gbps_at(0.5) == 1.0 and link.gbps_at(1.5) == 0.0 and link.gbps_at(9) == 2.0
    # 125 MB in [0,1) at 1 Gbps, nothing in [1,2), 125 MB at 2 Gbps -> 2.5 s
    assert link.reserve(250_000_000) == pytest.approx(1002.5)
    c.t = 1001.0
    assert link.current_gbps() == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "bandwidth"),
        ({"schedule": [(1, 1.0)]}, "start at t = 0"),
        ({"schedule": [(0, 1.0), (0, 2.0)]}, "increasing"),
        ({"schedule": [(0, 1.0), (1, 0.0)]}, "last schedule"),
        ({"gbps": -1.0}, ">= 0"),
        ({"gbps": 1.0, "rtt_ms": -1}, "rtt_ms"),
    ],
)
def test_link_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinkShaper(**kwargs)


# ---------------------------------------------------------------- monitor


def test_parse_tcp_info_fields() -> None:
    raw = bytearray(232)
    raw[0] = 1  # TCP_ESTABLISHED
    struct.pack_into("=I", raw, 16, 1448)  # snd_mss
    struct.pack_into("=I", raw, 24, 3)  # unacked
    struct.pack_into("=I", raw, 68, 12_345)  # rtt us
    struct.pack_into("=I", raw, 72, 678)  # rttvar
    struct.pack_into("=I", raw, 80, 10)  # cwnd
    struct.pack_into("=I", raw, 100, 42)  # total retrans
    struct.pack_into("=Q", raw, 120, 99_999)  # bytes acked
    struct.pack_into("=Q", raw, 160, 1_250_000)  # delivery rate B/s
    info = parse_tcp_info(bytes(raw))
    assert (info.state, info.snd_mss, info.unacked, info.rtt_us, info.rttvar_us) == (
        1,
        1448,
        3,
        12345,
        678,
    )
    assert (info.snd_cwnd, info.retransmits, info.bytes_acked, info.delivery_rate_bps) == (
        10,
        42,
        99_999,
        1_250_000,
    )
    short = parse_tcp_info(bytes(raw[:104]))
    assert short.bytes_acked is None and short.retransmits == 42
    with pytest.raises(ValueError, match="too short"):
        parse_tcp_info(b"\0" * 50)


def test_tcp_info_of_a_real_connection() -> None:
    ls = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    c.sendall(b"x" * 100_000)
    got = 0
    while got < 100_000:
        got += len(s.recv(1 << 16))
    info = read_tcp_info(c)
    if info is None:
        pytest.skip("TCP_INFO not available on this OS")
    assert info.state == 1 and info.bytes_acked == 100_001  # +1 for the SYN
    assert info.rtt_us > 0
    for x in (c, s, ls):
        x.close()


def test_monitor_accounting_and_capacity() -> None:
    link = LinkShaper(gbps=2.5)
    mon = LinkMeter(link=link)
    mon.add_queued(1000)
    mon.add_sent(600, was_queued=600)
    snap = mon.snapshot()
    assert snap.bytes_total == 600
    assert snap.bytes_in_flight == 400
    assert snap.capacity_gbps == 2.5
    assert snap.utilisation == pytest.approx(snap.gbps / 2.5)
    with pytest.raises(ValueError, match="halflife"):
        LinkMeter(halflife_s=0)


def test_tune_socket_sets_nodelay_and_keepalive() -> None:
    s = socket.socket()
    wire.tune_socket(s)
    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    s.close()
