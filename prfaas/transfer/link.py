"""Cross-cluster link emulation: a bandwidth cap (shared by all of a peer's connections), a
round-trip delay, and a piecewise-constant bandwidth schedule over time.

The link is modelled as a single serialising pipe: ``reserve(n)`` books the next ``n`` bytes on it
(starting when the pipe is free, never earlier than now, so idle time earns no burst credit) and
returns when their last byte reaches the receiver: serialisation end + RTT/2. Senders sleep until
that instant, then write the bytes to the (fast, local) socket.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkShaperSpec:
    """Parameters of an emulated (shaped) link; ``schedule`` overrides ``gbps`` when given.

    Not to be confused with ``prfaas.sim.deployment.LinkSpec``, the simulator's model of a link."""

    gbps: float | None = None
    rtt_ms: float = 0.0
    schedule: tuple[tuple[float, float], ...] = ()

    def build(self) -> LinkShaper:
        return LinkShaper(self.gbps, self.rtt_ms, list(self.schedule) or None)


class LinkShaper:
    """Bandwidth cap + delay + schedule; thread-safe, one instance per peer."""

    def __init__(
        self,
        gbps: float | None = None,
        rtt_ms: float = 0.0,
        schedule: Sequence[tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if schedule is None:
            if gbps is None:
                raise ValueError("give a bandwidth (gbps) or a schedule")
            schedule = [(0.0, gbps)]
        sched = [(float(t), float(g)) for t, g in schedule]
        if not sched or sched[0][0] != 0.0:
            raise ValueError("schedule must start at t = 0")
        if any(b[0] <= a[0] for a, b in zip(sched, sched[1:], strict=False)):
            raise ValueError("schedule times must be strictly increasing")
        if any(g < 0 for _, g in sched):
            raise ValueError("bandwidth must be >= 0")
        if sched[-1][1] <= 0:
            raise ValueError("the last schedule segment must have bandwidth > 0")
        if rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        self.schedule = sched
        self._times = [t for t, _ in sched]
        self.one_way_s = rtt_ms / 2000.0
        self.rtt_ms = rtt_ms
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._free_at = self._t0
        self._lock = threading.Lock()

    def gbps_at(self, t_rel: float) -> float:
        """Scheduled bandwidth at ``t_rel`` seconds after the link was created."""
        i = max(0, bisect.bisect_right(self._times, t_rel) - 1)
        return self.schedule[i][1]

    def current_gbps(self) -> float:
        return self.gbps_at(self._clock() - self._t0)

    def _serialise_end(self, start: float, nbytes: int) -> float:
        bits = nbytes * 8.0
        t = start - self._t0
        i = max(0, bisect.bisect_right(self._times, t) - 1)
        while True:
            rate = self.schedule[i][1] * 1e9
            seg_end = self._times[i + 1] if i + 1 < len(self._times) else float("inf")
            if rate > 0:
                need = bits / rate
                if t + need <= seg_end:
                    return self._t0 + t + need
                bits -= (seg_end - t) * rate
            t = seg_end
            i += 1

    def reserve(self, nbytes: int) -> float:
        """Book ``nbytes`` on the link; the clock time their last byte arrives."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            start = max(self._clock(), self._free_at)
            end = self._serialise_end(start, nbytes)
            self._free_at = end
        return end + self.one_way_s

    def wait_until(self, t: float) -> None:
        """Sleep until clock time ``t`` (an instant returned by ``reserve``)."""
        delay = t - self._clock()
        if delay > 0:
            self._sleep(delay)

    def transmit(self, nbytes: int) -> None:
        """Block the calling (sending) thread until ``nbytes`` would have crossed the link."""
        self.wait_until(self.reserve(nbytes))
