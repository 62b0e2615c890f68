"""Mutual HMAC-SHA256 challenge-response on every connection, before any request frame is read.

client -> HELLO(version, backend, session id, conn index, conn count, client nonce)
server -> CHALLENGE(server nonce, HMAC(secret, "server" | hello | server nonce))
client -> AUTH(HMAC(secret, "client" | hello | server nonce))   (or ERROR if the server's proof fails)
server -> AUTH_OK                                                 (or ERROR if the client's proof fails)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass

from prfaas.transfer import frames as wire
from prfaas.transfer.errors import AuthError, FrameError, error_from_code

HELLO = struct.Struct(
    "!HB16sHH32s"
)  # version, backend code, session id, conn index, n conns, nonce
PROTOCOL = b"prfaas-transfer-v1"
MIN_SECRET_BYTES = 16
HANDSHAKE_TIMEOUT_S = 10.0
BACKEND_CODES = {"tcp": 1, "mooncake": 2}


@dataclass(frozen=True)
class Hello:
    """What a client announced in its (authenticated) HELLO."""

    backend: int
    session_id: bytes
    conn_index: int
    n_conns: int


def check_secret(secret: bytes | str) -> bytes:
    """The cluster secret as bytes (ValueError if too short)."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"cluster secret must be at least {MIN_SECRET_BYTES} bytes")
    return key


def _proof(key: bytes, role: bytes, hello: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(
        key, PROTOCOL + b"|" + role + b"|" + hello + server_nonce, hashlib.sha256
    ).digest()


def _raise_peer_error(payload: bytes) -> None:
    o = wire.parse_json_payload(payload, "error")
    raise error_from_code(str(o.get("code")), f"peer refused: {o.get('message')}")


def client_handshake(
    sock: socket.socket,
    secret: bytes,
    backend: int,
    session_id: bytes,
    conn_index: int,
    n_conns: int,
) -> None:
    """Authenticate to the server and check its proof; AuthError on either failure."""
    old = sock.gettimeout()
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    hello = HELLO.pack(
        wire.FORMAT_VERSION, backend, session_id, conn_index, n_conns, os.urandom(32)
    )
    wire.send_buffers(sock, [wire.frame(wire.HELLO, hello)])
    ftype, payload = wire.read_small_frame(sock, {wire.CHALLENGE, wire.ERROR})
    if ftype == wire.ERROR:
        _raise_peer_error(payload)
    if len(payload) != 64:
        raise FrameError(f"CHALLENGE of {len(payload)} B, expected 64")
    server_nonce, server_proof = payload[:32], payload[32:]
    if not hmac.compare_digest(server_proof, _proof(secret, b"server", hello, server_nonce)):
        wire.send_buffers(
            sock, [wire.frame(wire.ERROR, wire.error_payload("auth", "server proof rejected"))]
        )
        raise AuthError("server failed the shared-secret challenge")
    wire.send_buffers(sock, [wire.frame(wire.AUTH, _proof(secret, b"client", hello, server_nonce))])
    ftype, payload = wire.read_small_frame(sock, {wire.AUTH_OK, wire.ERROR})
    if ftype == wire.ERROR:
        _raise_peer_error(payload)
    sock.settimeout(old)


class ServerHandshake:
    """The server side of the handshake as a state machine over whole frames, for an event loop:
    ``on_frame(ftype, payload)`` returns the frame bytes to send back and, once the client's
    proof checked out, sets ``hello``. Raises AuthError / FrameError (with ``reply`` set to an
    ERROR frame to send before closing, where the protocol has one)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.hello: Hello | None = None
        self.reply: bytes = b""  # an ERROR frame owed to the peer after a refusal
        self._raw: bytes | None = None
        self._nonce = b""

    @property
    def allowed(self) -> set[int]:
        return {wire.HELLO} if self._raw is None else {wire.AUTH, wire.ERROR}

    def on_frame(self, ftype: int, payload: bytes) -> bytes:
        if self._raw is None:
            return self._on_hello(payload)
        return self._on_auth(ftype, payload)

    def _on_hello(self, hello: bytes) -> bytes:
        if len(hello) != HELLO.size:
            raise FrameError(f"HELLO of {len(hello)} B, expected {HELLO.size}")
        version = HELLO.unpack(hello)[0]
        if version != wire.FORMAT_VERSION:
            self.reply = wire.frame(wire.ERROR, wire.error_payload("frame", f"version {version}"))
            raise FrameError(f"peer speaks wire version {version}, expected {wire.FORMAT_VERSION}")
        self._raw = hello
        self._nonce = os.urandom(32)
        proof = _proof(self.secret, b"server", hello, self._nonce)
        return wire.frame(wire.CHALLENGE, self._nonce + proof)

    def _on_auth(self, ftype: int, payload: bytes) -> bytes:
        assert self._raw is not None
        if ftype == wire.ERROR:
            o = wire.parse_json_payload(payload, "error")
            raise AuthError(f"client refused our proof: {o.get('message')}")
        if not hmac.compare_digest(payload, _proof(self.secret, b"client", self._raw, self._nonce)):
            self.reply = wire.frame(wire.ERROR, wire.error_payload("auth", "client proof rejected"))
            raise AuthError("client failed the shared-secret challenge")
        _, backend, session_id, conn_index, n_conns, _ = HELLO.unpack(self._raw)
        if not 0 <= conn_index < n_conns or n_conns > 64:
            raise FrameError(f"bad connection index {conn_index} of {n_conns}")
        self.hello = Hello(backend, session_id, conn_index, n_conns)
        return wire.frame(wire.AUTH_OK)


def server_handshake(sock: socket.socket, secret: bytes) -> Hello:
    """Challenge a new connection (blocking); returns its HELLO once both proofs check out."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    hs = ServerHandshake(secret)
    try:
        while hs.hello is None:
            ftype, payload = wire.read_small_frame(sock, hs.allowed)
            wire.send_buffers(sock, [hs.on_frame(ftype, payload)])
    except (AuthError, FrameError):
        if hs.reply:
            wire.send_buffers(sock, [hs.reply])
        raise
    sock.settimeout(None)
    return hs.hello
