"""The live router's scheduler: the observer, the policy and role switches, without any HTTP.

The gateway (``prfaas/server``) owns one :class:`LiveScheduler`.  It reports what happens to a request
(:meth:`~LiveScheduler.routed`, :meth:`~LiveScheduler.prefill_done`, :meth:`~LiveScheduler.kv_delivered`,
:meth:`~LiveScheduler.decode_done`), what its nodes report (:meth:`~LiveScheduler.link_reading`,
:meth:`~LiveScheduler.set_available`), asks :meth:`~LiveScheduler.decide` where a request goes and calls
:meth:`~LiveScheduler.tick` every poll interval.  A tick can start role switches: the node stops taking
work in its old role and drains; :meth:`~LiveScheduler.ready_switches` lists the drained ones, which the
gateway switches (node API or restart) and confirms with :meth:`~LiveScheduler.switch_done`.

Everything is fed to the same :class:`~prfaas.scheduling.observer.ClusterObserver` the simulator feeds,
so the policy reads the same :class:`~prfaas.scheduling.types.SystemState` in both.

:func:`deployment_topology` describes a deployment (any object with ``clusters`` (``name``, ``kind``,
``nodes`` with ``role``) and ``links`` (``src``, ``dst``, ``nominal_gbps``, ``rtt_ms``)), and
:func:`build_observer` / :func:`live_fleet` turn it and a hardware profile into the observer and the
planner's fleet.  Times are seconds on the caller's clock (``time.monotonic`` by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prfaas.scheduling.lengths import LengthDist, TruncatedLogNormal
from prfaas.scheduling.observer import ClusterObserver, ObservedCluster, ObservedLink
from prfaas.scheduling.planner import Fleet
from prfaas.scheduling.policies import Policy
from prfaas.scheduling.profile import HardwareProfile
from prfaas.scheduling.types import LinkState, RequestInfo, Role, RoleSwitch, RouteDecision


@dataclass(frozen=True)
class Topology:
    """Clusters (name, kind, node roles) and directed links (src, dst, nominal Gbps, RTT ms)."""

    clusters: tuple[tuple[str, str, tuple[Role, ...]], ...]
    links: tuple[tuple[str, str, float, float], ...] = ()

    def counts(self, prfaas: str | None, pd: str) -> tuple[int, int, int]:
        """(PrfaaS prefill nodes, PD-P nodes, PD-D nodes)."""
        n_f = n_p = n_d = 0
        for name, _, roles in self.clusters:
            if name == prfaas:
                n_f = sum(r is Role.PREFILL for r in roles)
            elif name == pd:
                n_p = sum(r is Role.PREFILL for r in roles)
                n_d = sum(r is Role.DECODE for r in roles)
        return n_f, n_p, n_d


def deployment_topology(cfg) -> Topology:
    """The :class:`Topology` of a deployment config (duck-typed: ``DeployConfig``)."""
    clusters = tuple((c.name, c.kind, tuple(Role(n.role) for n in c.nodes)) for c in cfg.clusters)
    links = tuple(
        (lk.src, lk.dst, float(lk.nominal_gbps), float(getattr(lk, "rtt_ms", 0.0)))
        for lk in cfg.links
    )
    return Topology(clusters, links)


def decode_profile(profile: HardwareProfile, bs_max: int) -> HardwareProfile:
    """``profile`` with the decode limit of a node: ``bs_max`` slots, the step time at that batch."""
    d = profile.to_dict()
    d.update(bs_max=int(bs_max), t_decode_s=float(profile.decode_step_time(int(bs_max))))
    return HardwareProfile.from_dict(d)


def build_observer(
    topo: Topology,
    profile: HardwareProfile,
    bs_max: int,
    max_len: int,
    prefixes: dict[str, object] | None = None,
    recent_window: int = 2000,
) -> ClusterObserver:
    """The observer of a deployment whose nodes all run ``profile`` (one hardware kind)."""
    prefixes = prefixes or {}
    clusters = [
        ObservedCluster(
            name,
            kind,
            list(roles),
            profile,
            bs_max if kind == "pd" else 0,
            prefixes.get(name),
            max_len,
        )
        for name, kind, roles in topo.clusters
    ]
    links = [ObservedLink(src, dst, gbps) for src, dst, gbps, _ in topo.links]
    return ClusterObserver(clusters, links, recent_window)


def live_fleet(
    topo: Topology,
    profile: HardwareProfile,
    bs_max: int,
    output_len: float,
    prfaas: str | None,
    pd: str,
) -> Fleet:
    """The planner's fleet of a deployment (instance counts, nominal PrfaaS->PD link)."""
    n_f, n_p, n_d = topo.counts(prfaas, pd)
    gbps = next((g for s, d, g, _ in topo.links if (s, d) == (prfaas, pd)), None)
    dec = decode_profile(profile, bs_max)
    return Fleet(
        profile if n_f else None, profile, dec, n_f, n_p, n_d, float(gbps or 1.0), output_len
    )


def default_prior(max_len: int) -> LengthDist:
    """Prompt lengths expected before any is observed: log-normal, median ``max_len / 8``, σ = 1,
    truncated to [16, max_len]."""
    import math

    hi = float(max(max_len, 32))
    return TruncatedLogNormal(math.log(hi / 8), 1.0, 16.0, hi)


@dataclass
class SwitchInProgress:
    cluster: str
    instance: int
    to_role: Role
    started_s: float
    reason: str = ""
    executing: bool = False


@dataclass
class LiveScheduler:
    """Observer + policy + role-switch bookkeeping of the live router (see the module docstring)."""

    observer: ClusterObserver
    policy: Policy
    clock: Callable[[], float] = time.monotonic
    switches: dict[tuple[str, int], SwitchInProgress] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    _link_busy: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    # ---- routing ------------------------------------------------------------------------------
    def state(self, now: float | None = None):
        return self.observer.snapshot(self.clock() if now is None else now)

    def decide(self, info: RequestInfo, now: float | None = None) -> RouteDecision:
        return self.policy.decide(info, self.state(now))

    def routed(self, info: RequestInfo, d: RouteDecision, now: float | None = None) -> None:
        self.observer.routed(self.clock() if now is None else now, info, d)

    def prefill_done(self, request_id: object, now: float | None = None) -> None:
        self.observer.prefill_done(self.clock() if now is None else now, request_id)

    def kv_delivered(self, request_id: object, now: float | None = None) -> None:
        self.observer.kv_delivered(self.clock() if now is None else now, request_id)

    def decode_done(
        self, request_id: object, now: float | None = None, output_len: int | None = None
    ) -> None:
        """The request left (finished, aborted or failed at any stage); ``output_len``: tokens it
        generated, when it finished."""
        self.observer.forget(self.clock() if now is None else now, request_id, output_len)

    # ---- node readings ------------------------------------------------------------------------
    def set_available(
        self, cluster: str, instance: int, up: bool, now: float | None = None
    ) -> None:
        self.observer.set_available(self.clock() if now is None else now, cluster, instance, up)

    def link_reading(
        self,
        src: str,
        dst: str,
        sent_bytes: float,
        in_flight: float,
        up: bool = True,
        busy_s: float | None = None,
        now: float | None = None,
        delivered_bytes: float | None = None,
    ) -> LinkState | None:
        """Cumulative bytes a cluster's nodes sent on ``src->dst`` and their bytes in flight.  With
        the senders' own counters (``delivered_bytes``: written to the wire so far, ``busy_s``:
        seconds with bytes queued so far, both monotone) they feed the estimator as they are.
        Without ``busy_s`` the busy time is sampled: an interval counts as busy when bytes were in
        flight at its end or the link delivered more than nothing in it; without
        ``delivered_bytes`` the delivered bytes are ``sent_bytes − in_flight``."""
        now = self.clock() if now is None else now
        b = self._link_busy.setdefault((src, dst), [now, 0.0, sent_bytes])
        last_t, busy, last_bytes = b
        if busy_s is None:
            if in_flight > 0 or sent_bytes > last_bytes:
                busy += max(now - last_t, 0.0)
            busy_s = busy
        self._link_busy[(src, dst)] = [now, busy_s, sent_bytes]
        delivered = max(sent_bytes - in_flight, 0.0) if delivered_bytes is None else delivered_bytes
        return self.observer.link_counters(now, src, dst, delivered, busy_s, in_flight, up)

    # ---- adaptation and role switches ---------------------------------------------------------
    def tick(self, now: float | None = None) -> list[RoleSwitch]:
        """The policy's periodic adaptation; starts the role switches it asks for (drain)."""
        now = self.clock() if now is None else now
        acts = self.policy.on_tick(now, self.observer.snapshot(now)) or []
        started = []
        for a in acts:
            key = (a.cluster, a.instance)
            if key in self.switches:
                continue
            self.observer.switch_started(now, a.cluster, a.instance, a.to_role)
            self.switches[key] = SwitchInProgress(a.cluster, a.instance, a.to_role, now, a.reason)
            self.history.append(
                f"{now:.1f} drain {a.cluster}#{a.instance} -> {a.to_role.value}: {a.reason}"
            )
            started.append(a)
        return started

    def ready_switches(self) -> list[SwitchInProgress]:
        """Switches whose node has drained and that the gateway has not started executing."""
        out = []
        for sw in self.switches.values():
            if not sw.executing and self.observer.drained(sw.cluster, sw.instance):
                out.append(sw)
        return out

    def switch_done(self, cluster: str, instance: int, now: float | None = None) -> None:
        """The node now serves in its new role."""
        now = self.clock() if now is None else now
        sw = self.switches.pop((cluster, instance))
        self.observer.switch_done(now, cluster, instance)
        self.history.append(f"{now:.1f} {cluster}#{instance} now {sw.to_role.value}")

    def role_reported(
        self, cluster: str, instance: int, role: Role, now: float | None = None
    ) -> bool:
        """The node reports serving in ``role`` (switched outside the gateway): the observer takes
        it from ``now`` (as a switch started and done at once).  False, and nothing changes, while
        a switch of that node is under way here (the gateway's own: it confirms the role), or
        when the observer cannot hold it (not a PD cluster with both roles)."""
        if (cluster, instance) in self.switches:
            return False
        now = self.clock() if now is None else now
        obs = self.observer
        try:
            obs.switch_started(now, cluster, instance, role)  # ValueError: same role, not PD
        except ValueError:
            return False
        obs.switch_done(now, cluster, instance)
        self.history.append(f"{now:.1f} {cluster}#{instance} reported {role.value}")
        return True

    def switch_failed(self, cluster: str, instance: int, now: float | None = None) -> None:
        """The switch could not be executed: the node goes back to its old role."""
        now = self.clock() if now is None else now
        sw = self.switches.pop((cluster, instance))
        self.observer.switch_cancelled(now, cluster, instance)
        self.history.append(f"{now:.1f} {cluster}#{instance} switch to {sw.to_role.value} failed")


def make_live_fleet_policy(
    topo: Topology,
    profile: HardwareProfile,
    bs_max: int,
    output_len: float,
    prfaas: str | None,
    pd: str,
    name: str = "prfaas",
    threshold: float | None = None,
    prior: LengthDist | None = None,
    max_len: int = 2048,
    rebalance: bool = True,
    adaptive_opts: dict | None = None,
    rebalance_opts: dict | None = None,
    cache_mode: str = "scarce",
) -> Policy:
    """The policy of a live deployment through :func:`~prfaas.scheduling.policies.make_policy`."""
    from prfaas.scheduling.policies import LongTermRebalancing, ShortTermAdaptation, make_policy

    if name != "prfaas":
        return make_policy(name, prfaas=prfaas or "prfaas", pd=pd)
    fleet = live_fleet(topo, profile, bs_max, output_len, prfaas, pd)
    adaptive = (
        None if threshold is not None else ShortTermAdaptation(fleet, **(adaptive_opts or {}))
    )
    rb: LongTermRebalancing | bool = (
        LongTermRebalancing(**(rebalance_opts or {})) if rebalance else False
    )
    return make_policy(
        "prfaas",
        threshold,
        fleet=fleet,
        prior=prior or default_prior(max_len),
        adaptive=adaptive or False,
        rebalance=rb,
        prfaas=prfaas or "prfaas",
        pd=pd,
        cache_mode=cache_mode,
        grid=None,
    )


__all__: Sequence[str] = (
    "LiveScheduler",
    "Topology",
    "build_observer",
    "decode_profile",
    "default_prior",
    "deployment_topology",
    "live_fleet",
    "make_live_fleet_policy",
)
