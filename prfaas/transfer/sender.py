"""Sender side shared by the backends: ``SenderBase`` and the connection count for a link.

A ``SenderBase`` keeps one ``PeerSession`` per receiver (``sender_session``: its connections,
dispatcher and I/O threads); a request is a ``PeerStream`` on it (``sender_stream``). Backends
subclass ``SenderBase`` and implement ``_dispatch_layer``. ``stream.send`` only queues and never
waits on the network.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from prfaas.kv.layout import CacheLayout
from prfaas.kv.unit import KVExport, TransferHeader
from prfaas.transfer import wire
from prfaas.transfer.auth import check_secret
from prfaas.transfer.backend import Peer, Sender
from prfaas.transfer.link import LinkShaperSpec
from prfaas.transfer.meter import LinkSnapshot
from prfaas.transfer.sender_session import PeerSession
from prfaas.transfer.sender_stream import PeerStream

__all__ = ["MAX_CONNECTIONS", "PeerSession", "PeerStream", "SenderBase", "connections_for_link"]

MAX_CONNECTIONS = 16


def tcp_window_bytes() -> int:
    """The largest send window the kernel grants one connection (``tcp_wmem`` max), else 4 MiB."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


def connections_for_link(gbps: float | None, rtt_ms: float | None, window: int = 0) -> int:
    """Connections needed to keep ``gbps`` in flight over ``rtt_ms`` when one connection's window
    is ``window`` bytes: ceil(bandwidth-delay product / window), in [1, MAX_CONNECTIONS]. An
    unknown rate is taken as 100 Gbps; an unknown RTT as 1 ms."""
    window = window or tcp_window_bytes()
    bdp = (gbps or 100.0) * 1e9 / 8 * (rtt_ms if rtt_ms is not None else 1.0) / 1e3
    return max(1, min(MAX_CONNECTIONS, math.ceil(bdp / window)))


class SenderBase(Sender):
    """Opens streams to receivers; one ``PeerSession`` per peer, created on first use.

    ``link`` emulates a cross-cluster link for every peer of this sender (None: unshaped).
    ``connections`` None sizes the connection count to the link (``connections_for_link``: the
    shaped link's rate and RTT, else the RTT measured on the first connection and 100 Gbps).
    A session idle for ``idle_close_s`` is closed and reopened on next use (receivers close idle
    connections after a longer time).
    """

    backend_code = 0

    def __init__(
        self,
        layout: CacheLayout,
        secret: bytes | str,
        *,
        connections: int | None = None,
        link: LinkShaperSpec | None = None,
        slice_bytes: int | None = None,
        connect_timeout: float = 10.0,
        idle_close_s: float = 120.0,
    ) -> None:
        if connections is not None and not 1 <= connections <= 64:
            raise ValueError(f"connections must be in [1, 64], got {connections}")
        if slice_bytes is None:  # big slices are cheaper; small ones keep a shaped link smooth
            slice_bytes = 1 << 20 if link is not None else 4 << 20
        if not 4096 <= slice_bytes <= wire.MAX_SLICE_BYTES:
            raise ValueError(f"slice_bytes must be in [4096, {wire.MAX_SLICE_BYTES}]")
        self.layout = layout
        self.secret = check_secret(secret)
        self.connections = connections
        self.link_spec = link
        self.slice_bytes = slice_bytes
        self.connect_timeout = connect_timeout
        self.idle_close_s = idle_close_s
        self._sessions: dict[Peer, PeerSession] = {}
        self._pinned: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _n_conns(self, connect_rtt_ms: float) -> int:
        """Connections per peer: as configured, else sized to the link (the shaped link's top
        rate and RTT plus the measured connect RTT; unshaped: 100 Gbps over the measured RTT)."""
        if self.connections is not None:
            return self.connections
        spec = self.link_spec
        if spec is not None:
            rate = max([g for _, g in spec.schedule] or [spec.gbps or 0.0]) or None
            return connections_for_link(rate, spec.rtt_ms + connect_rtt_ms)
        return connections_for_link(None, connect_rtt_ms)

    def _take_pinned(self, nbytes: int) -> torch.Tensor:
        """A pinned host staging buffer of at least ``nbytes`` (reused: pinning is slow)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._pinned) if nbytes <= b.numel() <= 2 * nbytes]
            if fits:  # by index: list.remove would compare tensors elementwise
                return self._pinned.pop(min(fits, key=lambda i: self._pinned[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def _give_pinned(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._pinned.append(buf)

    def session(self, peer: Peer) -> PeerSession:
        """The (re)connected session to ``peer``; AuthError if the peer fails authentication."""
        peer = (peer[0], int(peer[1]))
        stale = None
        with self._lock:
            s = self._sessions.get(peer)
            idle = s is not None and time.monotonic() - s.last_used > self.idle_close_s
            if idle and s is not None and s.error is None and not s.streams:
                stale, s = s, None
            if s is None or s.error is not None:
                s = PeerSession(self, peer)
                self._sessions[peer] = s
        if stale is not None:
            stale.close()
        return s

    def open(self, peer: Peer, header: TransferHeader) -> PeerStream:
        """Announce a request to ``peer``; send its layers with ``stream.send`` as they are computed."""
        return self.session(peer).open(header, None)

    def send_export(
        self, peer: Peer, export: KVExport, header_checksums: bool = False
    ) -> PeerStream:
        """Send a complete export; returns the stream. With ``header_checksums`` the layer
        checksums are computed up front (on the caller's thread), put in the header and reused
        for the COMMIT frames."""
        parts = export.parts if header_checksums else None
        stream = self.session(peer).open(export.header, parts)
        for part in export.parts:
            stream.send(part)
        stream.finish()
        return stream

    def snapshot(self, peer: Peer) -> LinkSnapshot:
        """Live link figures for ``peer`` (connects if needed)."""
        return self.session(peer).snapshot()

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()

    def __enter__(self) -> SenderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dispatch_layer(
        self, session: PeerSession, stream: PeerStream, layer: int, tensors: list[torch.Tensor]
    ) -> None:
        raise NotImplementedError
