"""Link capacity estimator: turns per-interval transfer counters into the readings a router sees.

Per interval it gets the bytes delivered and the time the link was busy (at least one transfer).
Throughput is bytes/interval.  The capacity estimate follows the measured rate whenever the link was
busy nearly all the interval with a queue behind it (then delivered rate = capacity); otherwise it
recovers toward the nominal bandwidth by ``recover`` per interval (optimistic probing, as TCP does).
"""

from __future__ import annotations

from prfaas.scheduling.types import LinkState


class LinkCapacityEstimator:
    """Keeps one :class:`LinkState` up to date from interval counters."""

    __slots__ = ("state", "busy_min", "recover", "_last_bytes", "_last_busy", "_last_t")

    def __init__(self, state: LinkState, busy_min: float = 0.95, recover: float = 0.05) -> None:
        if not 0 < busy_min <= 1:
            raise ValueError(f"busy_min must be in (0, 1], got {busy_min}")
        if recover < 0:
            raise ValueError(f"recover must be >= 0, got {recover}")
        self.state = state
        self.busy_min = busy_min
        self.recover = recover
        self._last_bytes = 0.0
        self._last_busy = 0.0
        self._last_t = 0.0

    def update(
        self, now: float, delivered_bytes: float, busy_s: float, in_flight: float
    ) -> LinkState:
        """Feed cumulative counters at time ``now``; returns the updated state."""
        dt = now - self._last_t
        if dt <= 0:
            return self.state
        s = self.state
        rate = (delivered_bytes - self._last_bytes) * 8 / 1e9 / dt
        busy = min((busy_s - self._last_busy) / dt, 1.0)
        s.throughput_gbps = rate
        s.busy_fraction = busy
        s.bytes_in_flight = in_flight
        if busy >= self.busy_min and in_flight > 0 and rate > 0:
            s.capacity_gbps = min(rate, s.nominal_gbps)
        else:
            s.capacity_gbps = min(
                s.nominal_gbps, max(s.capacity_gbps, rate) + self.recover * s.nominal_gbps
            )
        self._last_bytes, self._last_busy, self._last_t = delivered_bytes, busy_s, now
        return s


class LinkCounterFold:
    """One monotone pair of link counters (bytes, busy seconds) from several sources whose own
    counters may restart (a sender's peer session reopened, a node restarted: its counters go back
    to zero) or disappear.

    Each :meth:`update` reads every source's cumulative ``(bytes, busy_s)`` once: the totals grow by
    the sum of the sources' byte increments and by the largest of their busy increments (sources
    sharing one link overlap in time: the largest is a lower bound of the link's busy time, exact
    with one source).  A source whose counters went down restarted: its new values count whole.
    """

    __slots__ = ("bytes_total", "busy_s", "_last")

    def __init__(self) -> None:
        self.bytes_total = 0.0
        self.busy_s = 0.0
        self._last: dict[object, tuple[float, float]] = {}

    def update(self, readings: dict[object, tuple[float, float]]) -> tuple[float, float]:
        """``readings``: source key -> its cumulative (bytes, busy seconds); returns the totals."""
        add_b, add_busy = 0.0, 0.0
        for key, (b, busy) in readings.items():
            lb, lbusy = self._last.get(key, (0.0, 0.0))
            if b < lb or busy < lbusy:  # the source restarted
                lb, lbusy = 0.0, 0.0
            add_b += b - lb
            add_busy = max(add_busy, busy - lbusy)
            self._last[key] = (b, busy)
        self.bytes_total += add_b
        self.busy_s += add_busy
        return self.bytes_total, self.busy_s
