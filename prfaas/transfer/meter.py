"""Live link meter of one peer, sending side: EWMA throughput, bytes in flight, busy time (seconds
with bytes queued), per-connection TCP_INFO (RTT, retransmits).

It measures what flows; the capacity estimate from these counters (cumulative ``bytes_total``,
``busy_s``, ``bytes_in_flight``) is ``prfaas.scheduling.link_view.LinkCapacityEstimator``'s job.
``LinkSnapshot.capacity_gbps`` is only the shaped link's current rate, or else the best rate seen.
"""

from __future__ import annotations

import fcntl
import math
import socket
import struct
import sys
import termios
import threading
import time
from dataclasses import dataclass, field

from prfaas.transfer.link import LinkShaper

# offsets in Linux's struct tcp_info (include/uapi/linux/tcp.h)
_TCPI_U8 = struct.Struct("=BBBBBBBB")
_TCPI_RTO, _TCPI_SND_MSS, _TCPI_UNACKED, _TCPI_LOST, _TCPI_RETRANS = 8, 16, 24, 32, 36
_TCPI_RTT, _TCPI_RTTVAR, _TCPI_SND_CWND, _TCPI_TOTAL_RETRANS = 68, 72, 80, 100
_TCPI_BYTES_ACKED, _TCPI_DELIVERY_RATE = 120, 160
_TCP_INFO_LEN = 256


@dataclass(frozen=True)
class TcpInfo:
    """The fields of Linux ``TCP_INFO`` the scheduler cares about."""

    state: int
    rtt_us: int
    rttvar_us: int
    snd_cwnd: int
    snd_mss: int
    unacked: int
    lost: int
    retransmits: int  # tcpi_total_retrans
    bytes_acked: int | None
    delivery_rate_bps: int | None  # bytes/s, kernel >= 4.9


def parse_tcp_info(raw: bytes) -> TcpInfo:
    """Decode a raw ``struct tcp_info`` (ValueError if too short for the base fields)."""
    if len(raw) < 104:
        raise ValueError(f"tcp_info of {len(raw)} B is too short")

    def u32(off: int) -> int:
        return struct.unpack_from("=I", raw, off)[0]

    def u64(off: int) -> int | None:
        return struct.unpack_from("=Q", raw, off)[0] if len(raw) >= off + 8 else None

    return TcpInfo(
        state=raw[0],
        rtt_us=u32(_TCPI_RTT),
        rttvar_us=u32(_TCPI_RTTVAR),
        snd_cwnd=u32(_TCPI_SND_CWND),
        snd_mss=u32(_TCPI_SND_MSS),
        unacked=u32(_TCPI_UNACKED),
        lost=u32(_TCPI_LOST),
        retransmits=u32(_TCPI_TOTAL_RETRANS),
        bytes_acked=u64(_TCPI_BYTES_ACKED),
        delivery_rate_bps=u64(_TCPI_DELIVERY_RATE),
    )


def read_tcp_info(sock: socket.socket) -> TcpInfo | None:
    """``getsockopt(TCP_INFO)`` of a connected socket; None where the OS does not provide it."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN))
    except (OSError, ValueError):
        return None


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes still in the socket's send queue (TIOCOUTQ); 0 where unavailable."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return struct.unpack("=i", buf)[0]
    except (OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class ConnStats:
    index: int
    rtt_ms: float | None
    retransmits: int | None
    unsent_bytes: int


@dataclass(frozen=True)
class LinkSnapshot:
    """What the scheduler reads about one peer link."""

    gbps: float  # EWMA of the send throughput
    capacity_gbps: float  # emulated link rate, else the best observed/estimated rate
    bytes_in_flight: int  # queued in the sender + unsent in socket buffers
    rtt_ms: float | None  # emulated RTT + mean TCP RTT of the connections
    retransmits: int  # total over the connections
    utilisation: float  # gbps / capacity_gbps
    bytes_total: int  # cumulative bytes written to the connections
    busy_s: float = 0.0  # cumulative seconds with bytes queued for this peer
    connections: list[ConnStats] = field(default_factory=list)


class LinkMeter:
    """Counts a peer's sent bytes and busy time; ``snapshot()`` is safe to call from any thread."""

    def __init__(self, halflife_s: float = 0.5, link: LinkShaper | None = None) -> None:
        if halflife_s <= 0:
            raise ValueError("halflife_s must be > 0")
        self._tau = halflife_s / math.log(2)
        self.link = link
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._ewma_bps = 0.0
        self._peak_bps = 0.0
        self._pending = 0
        self._last = time.monotonic()
        self.bytes_total = 0
        self.queued_bytes = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)

    def _queue(self, n: int) -> None:  # under the lock
        self.queued_bytes += n
        if self.queued_bytes > 0 and self._busy_since is None:
            self._busy_since = time.monotonic()
        elif self.queued_bytes <= 0 and self._busy_since is not None:
            self._busy_s += time.monotonic() - self._busy_since
            self._busy_since = None

    def add_queued(self, n: int) -> None:
        with self._lock:
            self._queue(n)

    @property
    def busy_s(self) -> float:
        """Cumulative seconds during which bytes were queued for this peer."""
        with self._lock:
            extra = 0.0 if self._busy_since is None else time.monotonic() - self._busy_since
            return self._busy_s + extra

    def add_sent(self, n: int, was_queued: int = 0) -> None:
        """Record ``n`` bytes written to the wire (``was_queued`` of them leave the queue)."""
        with self._lock:
            self.bytes_total += n
            self._queue(-was_queued)
            self._pending += n
            self._update(time.monotonic(), min_dt=0.01)

    def _update(self, now: float, min_dt: float) -> None:
        dt = now - self._last
        if dt < min_dt or dt <= 0:
            return
        inst = self._pending * 8 / dt
        alpha = 1.0 - math.exp(-dt / self._tau)
        self._ewma_bps += alpha * (inst - self._ewma_bps)
        self._peak_bps = max(self._peak_bps, self._ewma_bps)
        self._pending = 0
        self._last = now

    def snapshot(self) -> LinkSnapshot:
        with self._lock:
            self._update(time.monotonic(), min_dt=0.0)
            gbps = self._ewma_bps / 1e9
            peak = self._peak_bps / 1e9
            queued = self.queued_bytes
            total = self.bytes_total
            socks = list(self._socks)
        busy = self.busy_s
        conns, rtts, retrans, unsent_sum, delivery = [], [], 0, 0, 0.0
        for i, s in enumerate(socks):
            info = read_tcp_info(s) if s.fileno() >= 0 else None
            unsent = unsent_bytes(s) if s.fileno() >= 0 else 0
            unsent_sum += unsent
            if info is not None:
                rtts.append(info.rtt_us / 1000.0)
                retrans += info.retransmits
                delivery += (info.delivery_rate_bps or 0) * 8 / 1e9
            conns.append(
                ConnStats(
                    i,
                    None if info is None else info.rtt_us / 1000.0,
                    None if info is None else info.retransmits,
                    unsent,
                )
            )
        emulated_rtt = self.link.rtt_ms if self.link is not None else 0.0
        rtt = (sum(rtts) / len(rtts) if rtts else 0.0) + emulated_rtt
        if self.link is not None:
            capacity = self.link.current_gbps()
        else:
            capacity = max(peak, delivery, gbps)
        return LinkSnapshot(
            gbps=gbps,
            capacity_gbps=capacity,
            bytes_in_flight=queued + unsent_sum,
            rtt_ms=rtt if (rtts or self.link is not None) else None,
            retransmits=retrans,
            utilisation=(gbps / capacity) if capacity > 0 else 0.0,
            bytes_total=total,
            busy_s=busy,
            connections=conns,
        )
