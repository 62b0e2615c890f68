"""One observer of the cluster: the simulator and the live router feed it the same events and read
the same :class:`~prfaas.scheduling.types.SystemState` from it.

Events (times in seconds on the caller's clock, lengths in tokens, bytes in bytes):

* :meth:`ClusterObserver.routed` — a request was routed: its prefill instance's queue-drain estimate
  grows by ``T_prefill(uncached)`` from the cluster's hardware profile, its decode instance gets one
  more assigned request, the post-match length joins the recent window, the prefix index is looked up
  (LRU touch, hit statistics).
* :meth:`~ClusterObserver.prefill_done` — the prefill ended: its instance's queue shrinks and drains
  at ``now + T_prefill`` of what is still queued there; the prompt's blocks enter the prefix index of
  the cluster that prefilled it.
* :meth:`~ClusterObserver.kv_delivered` — the KV is in place at the decode instance: it takes a slot
  (``slots_used``) or waits for one (``waiting``), FIFO, up to ``bs_max`` slots.
* :meth:`~ClusterObserver.decode_done` — the request left its decode slot; a waiting one takes it.
* :meth:`~ClusterObserver.link_counters` — cumulative link counters (delivered bytes, busy seconds,
  bytes in flight) for the :class:`LinkCapacityEstimator` of that directed link.
* :meth:`~ClusterObserver.set_available` (a node went down / came back), :meth:`~ClusterObserver.
  switch_started` / :meth:`~ClusterObserver.switch_done` (role switches).

:meth:`~ClusterObserver.snapshot` returns the observer's own state object with ``now`` set; it stays
valid until the next event (copy it with :func:`copy.deepcopy` to keep it).  Instances that do not
take work in a role (decode role, draining, down) read ``inf`` in ``busy_until`` / ``load``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from prfaas.scheduling.link_view import LinkCapacityEstimator
from prfaas.scheduling.profile import HardwareProfile
from prfaas.scheduling.types import (
    INF,
    ClusterState,
    DecodePool,
    LinkState,
    PrefillPool,
    RequestInfo,
    Role,
    RouteDecision,
    SystemState,
)

TABLE_STEP = 16  # tokens between the points of a prefill-time table


def state_dict(state: SystemState) -> dict:
    """A plain, comparable (and JSON-able, ``inf`` aside) copy of a :class:`SystemState`."""
    out: dict = {
        "now": state.now,
        "recent_uncached": list(state.recent_uncached),
        "recent_output": list(state.recent_output),
        "clusters": {},
    }
    for name, c in state.clusters.items():
        d: dict = {"kind": c.kind, "roles": [r.value for r in c.roles]}
        d["switching"] = [None if r is None else r.value for r in c.switching]
        if c.prefill is not None:
            p = c.prefill
            d["prefill"] = {
                "busy_until": list(p.busy_until),
                "queue_reqs": list(p.queue_reqs),
                "queue_tokens": list(p.queue_tokens),
            }
        if c.decode is not None:
            q = c.decode
            d["decode"] = {
                "slots_used": list(q.slots_used),
                "waiting": list(q.waiting),
                "bs_max": list(q.bs_max),
                "load": list(q.load),
            }
        if c.prefix is not None and hasattr(c.prefix, "_blocks"):
            d["prefix_blocks"] = list(c.prefix._blocks.items())  # noqa: SLF001
        out["clusters"][name] = d
    out["links"] = {
        f"{s}->{t}": {
            "capacity_gbps": ls.capacity_gbps,
            "throughput_gbps": ls.throughput_gbps,
            "bytes_in_flight": ls.bytes_in_flight,
            "busy_fraction": ls.busy_fraction,
        }
        for (s, t), ls in state.links.items()
    }
    return out


def length_table(fn: Callable, max_len: int) -> Callable[[int], float]:
    """Fast scalar version of a vectorised length function: a 16-token grid with linear
    interpolation up to ``max_len`` (beyond it, and below 16 tokens, ``fn`` itself)."""
    xs = np.arange(0, max_len + 2 * TABLE_STEP, TABLE_STEP, dtype=float)
    xs[0] = 1.0
    ys_l = np.asarray(fn(xs), dtype=float).tolist()
    n = len(ys_l)
    step = TABLE_STEP

    def f(length: int) -> float:
        k = length // step
        if k == 0 or k >= n - 1:
            return float(fn(float(length)))
        y0 = ys_l[k]
        return y0 + (ys_l[k + 1] - y0) * (length - k * step) / step

    return f


@dataclass
class ObservedCluster:
    """What the observer knows of one cluster: its nodes' roles, the prefill profile (queue-drain
    estimates), the decode slot limit, the prefix index.  ``prefill_profile`` None: no node of the
    cluster can prefill; ``bs_max`` 0: none decodes (a PrfaaS cluster)."""

    name: str
    kind: str  # "prfaas" | "pd"
    roles: list[Role]
    prefill_profile: HardwareProfile | None = None
    bs_max: int = 0
    prefix: object | None = None  # PrefixIndex or anything with its lookup/insert/match API
    max_len: int = 131072  # longest prompt expected (prefill-time table size)

    def __post_init__(self) -> None:
        if self.kind not in ("prfaas", "pd"):
            raise ValueError(f"cluster {self.name!r}: kind must be prfaas or pd")
        if not self.roles:
            raise ValueError(f"cluster {self.name!r}: no nodes")
        if self.bs_max < 0 or self.max_len < 1:
            raise ValueError(f"cluster {self.name!r}: bs_max >= 0 and max_len >= 1 required")
        if any(r is Role.PREFILL for r in self.roles) and self.prefill_profile is None:
            raise ValueError(f"cluster {self.name!r}: prefill nodes need a prefill profile")
        if self.kind == "pd" and any(r is Role.DECODE for r in self.roles) and not self.bs_max:
            raise ValueError(f"cluster {self.name!r}: decode nodes need bs_max >= 1")


@dataclass
class ObservedLink:
    """A directed cross-cluster link and its monitor's settings."""

    src: str
    dst: str
    nominal_gbps: float
    busy_min: float = 0.95
    recover: float = 0.05


@dataclass(slots=True)
class _Req:
    c: int
    i: int
    dc: int
    di: int
    uncached: int
    service_s: float
    prompt_len: int
    hash_ids: Sequence[int] | None
    phase: int = 0  # 0 routed, 1 prefilled, 2 KV in place


@dataclass
class ObserverStats:
    routed: int = 0
    prefilled: int = 0
    delivered: int = 0
    decoded: int = 0
    events: list[str] = field(default_factory=list)


class ClusterObserver:
    """The router's and the simulator's one view of the deployment (see the module docstring)."""

    def __init__(
        self,
        clusters: Sequence[ObservedCluster],
        links: Sequence[ObservedLink] = (),
        recent_window: int = 2000,
    ) -> None:
        if recent_window < 1:
            raise ValueError("recent_window must be >= 1")
        names = [c.name for c in clusters]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"observer needs >= 1 cluster with unique names, got {names}")
        self.specs = list(clusters)
        self.cidx = {c.name: k for k, c in enumerate(clusters)}
        self._ptime: list[Callable[[int], float] | None] = []
        self._bsm: list[int] = []
        self._out_s: list[list[float]] = []  # estimated prefill seconds still queued per instance
        self._bu: list[list[float]] = []  # drain estimate kept while an instance reads inf
        self._present: list[list[int]] = []  # requests whose KV is at the decode instance
        self._assigned: list[list[int]] = []  # routed to the decode instance and not done
        self._up: list[list[bool]] = []
        self._switching: list[list[Role | None]] = []
        cstates: dict[str, ClusterState] = {}
        for spec in clusters:
            n = len(spec.roles)
            roles = list(spec.roles)
            pp = spec.prefill_profile
            self._ptime.append(length_table(pp.t_prefill, spec.max_len) if pp else None)
            pre = None
            if pp is not None:
                bu = [0.0 if r is Role.PREFILL else INF for r in roles]
                pre = PrefillPool(bu, [0] * n, [0] * n)
            dec = None
            bsm = int(spec.bs_max) if spec.kind == "pd" else 0
            if bsm:
                dec = DecodePool(
                    [0] * n,
                    [0] * n,
                    [bsm if r is Role.DECODE else 0 for r in roles],
                    [0.0 if r is Role.DECODE else INF for r in roles],
                )
            self._bsm.append(bsm)
            self._out_s.append([0.0] * n)
            self._bu.append([0.0] * n)
            self._present.append([0] * n)
            self._assigned.append([0] * n)
            self._up.append([True] * n)
            self._switching.append([None] * n)
            cstates[spec.name] = ClusterState(
                spec.name, spec.kind, pre, dec, spec.prefix, roles, self._switching[-1]
            )
        self.monitors: dict[tuple[str, str], LinkCapacityEstimator] = {}
        lstates: dict[tuple[str, str], LinkState] = {}
        for lk in links:
            if lk.src not in self.cidx or lk.dst not in self.cidx:
                raise ValueError(f"link {lk.src}->{lk.dst} names an unknown cluster")
            ls = LinkState(lk.src, lk.dst, lk.nominal_gbps, lk.nominal_gbps)
            lstates[(lk.src, lk.dst)] = ls
            self.monitors[(lk.src, lk.dst)] = LinkCapacityEstimator(ls, lk.busy_min, lk.recover)
        self.state = SystemState(
            0.0, cstates, lstates, deque(maxlen=recent_window), deque(maxlen=recent_window)
        )
        self.cstates = [cstates[c.name] for c in clusters]
        self._reqs: dict[object, _Req] = {}
        self.stats = ObserverStats()

    # ---- reading ------------------------------------------------------------------------------
    def snapshot(self, now: float) -> SystemState:
        """The observable state at ``now`` (the observer's own object: valid until the next event)."""
        self.state.now = now
        return self.state

    def prefill_time(self, cluster: str, uncached: int) -> float:
        """The profile's prefill seconds of ``uncached`` tokens on one instance of ``cluster``."""
        f = self._ptime[self.cidx[cluster]]
        if f is None:
            raise ValueError(f"cluster {cluster!r} has no prefill profile")
        return f(uncached)

    def pending(self) -> int:
        """Requests routed and not yet done."""
        return len(self._reqs)

    # ---- request events -----------------------------------------------------------------------
    def routed(self, now: float, req: RequestInfo, d: RouteDecision) -> float:
        """A request was routed; returns the profile's prefill seconds charged to its instance."""
        c = self.cidx[d.prefill_cluster]
        dc = self.cidx[d.decode_cluster]
        i, di, u = d.prefill_instance, d.decode_instance, d.uncached_len
        f = self._ptime[c]
        if f is None:
            raise ValueError(f"cluster {d.prefill_cluster!r} cannot prefill")
        if req.request_id in self._reqs:
            raise ValueError(f"request {req.request_id!r} routed twice")
        t = f(u)
        cs = self.cstates[c]
        pool = cs.prefill
        bu = pool.busy_until
        if bu[i] != INF:
            bu[i] = (bu[i] if bu[i] > now else now) + t
        else:
            b = self._bu[c]
            b[i] = (b[i] if b[i] > now else now) + t
        self._out_s[c][i] += t
        pool.queue_reqs[i] += 1
        pool.queue_tokens[i] += u
        da = self._assigned[dc]
        da[di] += 1
        dpool = self.cstates[dc].decode
        if dpool is not None and dpool.load[di] != INF:
            dpool.load[di] = da[di] / dpool.bs_max[di]
        self.state.recent_uncached.append(u)
        px = cs.prefix
        h = req.hash_ids
        if px is not None and h:
            px.lookup(h, req.prompt_len)
        self._reqs[req.request_id] = _Req(c, i, dc, di, u, t, req.prompt_len, h)
        self.stats.routed += 1
        return t

    def prefill_done(self, now: float, request_id: object, insert_prefix: bool = True) -> None:
        """The request's prefill ended on its instance (prompt blocks enter that cluster's index)."""
        r = self._reqs[request_id]
        if r.phase != 0:
            raise ValueError(f"request {request_id!r}: prefill_done twice")
        r.phase = 1
        c, i = r.c, r.i
        pool = self.cstates[c].prefill
        pool.queue_reqs[i] -= 1
        pool.queue_tokens[i] -= r.uncached
        out = self._out_s[c]
        rest = out[i] - r.service_s
        if pool.queue_reqs[i] <= 0 or rest < 0:
            rest = 0.0
        out[i] = rest
        if pool.busy_until[i] != INF:
            pool.busy_until[i] = now + rest
        else:
            self._bu[c][i] = now + rest
        px = self.cstates[c].prefix
        if insert_prefix and px is not None and r.hash_ids:
            px.insert(r.hash_ids, r.prompt_len, i)
        self.stats.prefilled += 1

    def kv_delivered(self, now: float, request_id: object) -> None:
        """The request's KV is in place at its decode instance: it takes a slot or waits."""
        r = self._reqs[request_id]
        if r.phase == 2:
            raise ValueError(f"request {request_id!r}: kv_delivered twice")
        if r.phase == 0:  # a caller that learns of the hand-off only (no separate prefill event)
            self.prefill_done(now, request_id)
        r.phase = 2
        dc, di = r.dc, r.di
        pres = self._present[dc]
        pres[di] += 1
        dpool = self.cstates[dc].decode
        if pres[di] <= self._bsm[dc]:
            dpool.slots_used[di] += 1
        else:
            dpool.waiting[di] += 1
        self.stats.delivered += 1

    def decode_done(self, now: float, request_id: object, output_len: int | None = None) -> None:
        """The request finished (or was aborted): its decode slot, or its place in the queue, frees;
        ``output_len`` (tokens it generated) joins the recent window of output lengths."""
        r = self._reqs[request_id]
        if r.phase == 0:  # failed before its prefill ended
            self.prefill_done(now, request_id, insert_prefix=False)
        del self._reqs[request_id]
        dc, di = r.dc, r.di
        dpool = self.cstates[dc].decode
        if r.phase == 2:
            self._present[dc][di] -= 1
            if dpool.waiting[di] > 0:
                dpool.waiting[di] -= 1
            else:
                dpool.slots_used[di] -= 1
        da = self._assigned[dc]
        da[di] -= 1
        if dpool is not None and dpool.load[di] != INF:
            dpool.load[di] = da[di] / dpool.bs_max[di]
        self.stats.decoded += 1
        if output_len is not None:
            self.state.recent_output.append(int(output_len))

    def forget(self, now: float, request_id: object, output_len: int | None = None) -> None:
        """decode_done for a request at any stage (routed and then abandoned too); unknown: no-op."""
        if request_id in self._reqs:
            self.decode_done(now, request_id, output_len)

    # ---- links --------------------------------------------------------------------------------
    def link_counters(
        self,
        now: float,
        src: str,
        dst: str,
        delivered_bytes: float,
        busy_s: float,
        in_flight: float,
        up: bool = True,
    ) -> LinkState | None:
        """Feed one directed link's cumulative counters; ``up`` False: the link is cut (capacity 0
        until it is up again).  Returns its state (None for a link the observer does not know)."""
        mon = self.monitors.get((src, dst))
        if mon is None:
            return None
        s = mon.update(now, delivered_bytes, busy_s, in_flight)
        if not up:
            s.capacity_gbps = 0.0
        elif s.capacity_gbps <= 0.0:
            s.capacity_gbps = s.nominal_gbps * mon.recover
        return s

    # ---- nodes --------------------------------------------------------------------------------
    def _accepting(self, c: int, i: int, role: Role) -> bool:
        cs = self.cstates[c]
        return self._up[c][i] and self._switching[c][i] is None and cs.roles[i] is role

    def _refresh(self, c: int, i: int, now: float) -> None:
        cs = self.cstates[c]
        pool, dpool = cs.prefill, cs.decode
        if pool is not None:
            if self._accepting(c, i, Role.PREFILL):
                if pool.busy_until[i] == INF:
                    b = self._bu[c][i]
                    pool.busy_until[i] = b if b > now else now
            elif pool.busy_until[i] != INF:
                self._bu[c][i] = pool.busy_until[i]
                pool.busy_until[i] = INF
        if dpool is not None:
            if self._accepting(c, i, Role.DECODE):
                dpool.load[i] = self._assigned[c][i] / dpool.bs_max[i]
            else:
                dpool.load[i] = INF

    def set_available(self, now: float, cluster: str, instance: int, up: bool) -> None:
        """A node went down (``up`` False: it takes no work) or came back."""
        c = self.cidx[cluster]
        if self._up[c][instance] != up:
            self._up[c][instance] = up
            self._refresh(c, instance, now)

    def available(self, cluster: str, instance: int) -> bool:
        return self._up[self.cidx[cluster]][instance]

    def switching(self, cluster: str, instance: int) -> Role | None:
        """The role a node is switching to (None when it is not switching)."""
        return self._switching[self.cidx[cluster]][instance]

    def drained(self, cluster: str, instance: int) -> bool:
        """No work left on the node in its current role (prefill queue empty, no decode request)."""
        c = self.cidx[cluster]
        cs = self.cstates[c]
        if cs.roles[instance] is Role.PREFILL:
            return cs.prefill.queue_reqs[instance] <= 0
        return self._assigned[c][instance] <= 0

    def switch_started(self, now: float, cluster: str, instance: int, to_role: Role) -> None:
        """A PD node stops taking work in its current role (it drains, then switches)."""
        c = self.cidx[cluster]
        cs = self.cstates[c]
        if cs.kind != "pd" or cs.prefill is None or cs.decode is None:
            raise ValueError(f"role switch needs a PD cluster with both roles: {cluster}")
        if cs.roles[instance] is to_role or self._switching[c][instance] is not None:
            raise ValueError(f"invalid role switch of {cluster}#{instance} to {to_role}")
        self._switching[c][instance] = to_role
        self._refresh(c, instance, now)
        self.stats.events.append(f"{now:.1f}s {cluster}#{instance} draining -> {to_role.value}")

    def switch_done(self, now: float, cluster: str, instance: int) -> None:
        """The node serves in its new role from ``now``."""
        c = self.cidx[cluster]
        to = self._switching[c][instance]
        if to is None:
            raise ValueError(f"{cluster}#{instance} is not switching")
        cs = self.cstates[c]
        self._switching[c][instance] = None
        cs.roles[instance] = to
        cs.decode.bs_max[instance] = self._bsm[c] if to is Role.DECODE else 0
        self._bu[c][instance] = now
        self._out_s[c][instance] = 0.0
        self._refresh(c, instance, now)
        self.stats.events.append(f"{now:.1f}s {cluster}#{instance} now {to.value}")

    def switch_cancelled(self, now: float, cluster: str, instance: int) -> None:
        """A switch that could not be carried out: the node takes work in its old role again."""
        c = self.cidx[cluster]
        if self._switching[c][instance] is None:
            raise ValueError(f"{cluster}#{instance} is not switching")
        self._switching[c][instance] = None
        self._refresh(c, instance, now)
        self.stats.events.append(
            f"{now:.1f}s {cluster}#{instance} stays {self.cstates[c].roles[instance].value}"
        )
