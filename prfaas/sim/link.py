"""A link whose bandwidth is shared equally by concurrent transfers (processor sharing).

Virtual time ``v`` counts the bytes each active flow has been served; it advances at ``cap / n`` bytes
per second, so a flow added with ``b`` bytes at virtual time ``v0`` completes when ``v`` reaches
``v0 + b``.  Adding or finishing a flow and changing the capacity are O(log n).  The capacity follows
a piecewise-constant schedule (``(start_s, gbps)`` steps) driven by the simulator.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

INF = float("inf")


def check_schedule(
    nominal_gbps: float, schedule: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Validate a bandwidth schedule; returns it sorted as ``[(start_s, gbps), ...]``."""
    if not nominal_gbps > 0:
        raise ValueError(f"link bandwidth must be > 0 Gbps, got {nominal_gbps}")
    out = []
    for item in schedule:
        if len(item) != 2:
            raise ValueError(f"schedule steps are (start_s, gbps) pairs, got {item!r}")
        t, g = float(item[0]), float(item[1])
        if t < 0 or not g > 0:
            raise ValueError(f"schedule step needs start_s >= 0 and gbps > 0, got {item!r}")
        out.append((t, g))
    return sorted(out)


class Link:
    """One directed link with processor-shared bandwidth."""

    __slots__ = (
        "src",
        "dst",
        "nominal_gbps",
        "cap",
        "v",
        "last_t",
        "heap",
        "sum_vf",
        "gen",
        "added_bytes",
        "busy_s",
        "_seq",
    )

    def __init__(self, src: str, dst: str, gbps: float) -> None:
        if not gbps > 0:
            raise ValueError(f"link {src}->{dst}: bandwidth must be > 0 Gbps, got {gbps}")
        self.src = src
        self.dst = dst
        self.nominal_gbps = float(gbps)
        self.cap = gbps * 1e9 / 8  # bytes/s
        self.v = 0.0
        self.last_t = 0.0
        self.heap: list[tuple[float, int, int]] = []  # (virtual finish, seq, token)
        self.sum_vf = 0.0
        self.gen = 0
        self.added_bytes = 0.0
        self.busy_s = 0.0
        self._seq = 0

    @property
    def gbps(self) -> float:
        return self.cap * 8 / 1e9

    @property
    def n_flows(self) -> int:
        return len(self.heap)

    def advance(self, now: float) -> None:
        """Serve the active flows up to ``now``."""
        dt = now - self.last_t
        if dt > 0:
            n = len(self.heap)
            if n:
                self.v += dt * self.cap / n
                self.busy_s += dt
            self.last_t = now

    def add(self, now: float, nbytes: float, token: int) -> None:
        """Start a transfer of ``nbytes`` (call :meth:`next_done` afterwards to reschedule)."""
        if nbytes < 0:
            raise ValueError(f"transfer size must be >= 0 bytes, got {nbytes}")
        self.advance(now)
        vf = self.v + nbytes
        self._seq += 1
        heapq.heappush(self.heap, (vf, self._seq, token))
        self.sum_vf += vf
        self.added_bytes += nbytes
        self.gen += 1

    def set_gbps(self, now: float, gbps: float) -> None:
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be > 0 Gbps, got {gbps}")
        self.advance(now)
        self.cap = gbps * 1e9 / 8
        self.gen += 1

    def next_done(self) -> float:
        """Absolute time at which the next flow finishes at the current rates (inf if idle)."""
        if not self.heap:
            return INF
        rem = self.heap[0][0] - self.v
        return self.last_t + (rem * len(self.heap) / self.cap if rem > 0 else 0.0)

    def pop_done(self, now: float, out: list[int]) -> None:
        """Append the tokens of flows finished by ``now`` to ``out``."""
        self.advance(now)
        heap = self.heap
        # done: within rounding of the bytes, or of the time (a remainder served in less than the
        # clock's resolution at ``now`` would be rescheduled at ``now`` again and again)
        slack = 4 * math.ulp(now) * self.cap / max(len(heap), 1)
        lim = self.v * (1 + 1e-12) + 1e-6 + slack
        while heap and heap[0][0] <= lim:
            vf, _, tok = heapq.heappop(heap)
            self.sum_vf -= vf
            out.append(tok)
        if not heap:
            self.sum_vf = 0.0
        self.gen += 1

    def bytes_in_flight(self) -> float:
        return max(self.sum_vf - len(self.heap) * self.v, 0.0)

    def delivered_bytes(self) -> float:
        return self.added_bytes - self.bytes_in_flight()
