"""Routing policies: one implementation for the simulator and the live router.

A policy reads a :class:`~prfaas.scheduling.types.RequestInfo` and the observable
:class:`~prfaas.scheduling.types.SystemState` and returns a
:class:`~prfaas.scheduling.types.RouteDecision`; ``on_tick`` lets it adapt (short-term threshold
re-search, long-term role rebalancing) and returns role-switch actions.  Instances inside a cluster are
picked by least load (prefill: earliest estimated queue drain, with prefix-cache affinity when the
cache owner is within ``affinity_slack_s``; decode: fewest assigned requests per slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from prfaas.scheduling.lengths import Empirical, LengthDist
from prfaas.scheduling.planner import Fleet, best_threshold
from prfaas.scheduling.types import (
    INF,
    ClusterState,
    RequestInfo,
    Role,
    RoleSwitch,
    RouteDecision,
    SystemState,
)

CACHE_MODES = ("oblivious", "scarce", "abundant", "auto")


def _pick_prefill(
    cs: ClusterState, req: RequestInfo, now: float, affinity_slack_s: float, cached: int
) -> int:
    pool = cs.prefill
    if pool is None:
        raise ValueError(f"cluster {cs.name!r} has no prefill instances")
    i = pool.least_loaded()
    if i < 0:
        raise ValueError(f"cluster {cs.name!r}: no prefill instance accepts work")
    if cached and affinity_slack_s > 0 and cs.prefix is not None and req.hash_ids:
        owner = cs.prefix.owner(req.hash_ids, cached // cs.prefix.block_tokens)
        if owner >= 0:
            bu = pool.busy_until
            if bu[owner] != INF and max(bu[owner], now) - max(bu[i], now) <= affinity_slack_s:
                return owner
    return i


def _pick_decode(cs: ClusterState) -> int:
    if cs.decode is None:
        raise ValueError(f"cluster {cs.name!r} has no decode instances")
    d = cs.decode.least_loaded()
    if d < 0:
        raise ValueError(f"cluster {cs.name!r}: no decode instance accepts work")
    return d


class Policy:
    """Base class: ``decide`` routes a request, ``on_tick`` adapts (default: nothing)."""

    name = "policy"
    threshold: float | None = None

    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:  # pragma: no cover
        raise NotImplementedError

    def on_tick(self, now: float, state: SystemState) -> list[RoleSwitch]:
        return []


class HomogeneousPD(Policy):
    """Everything in one PD cluster: PD-P prefills, PD-D decodes, KV over RDMA."""

    name = "homogeneous-pd"

    def __init__(self, pd: str = "pd", affinity_slack_s: float = 1.0) -> None:
        self.pd = pd
        self.affinity_slack_s = affinity_slack_s

    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:
        cs = state.clusters[self.pd]
        cached = state.cached_prefix(self.pd, req)
        i = _pick_prefill(cs, req, state.now, self.affinity_slack_s, cached)
        d = _pick_decode(cs)
        return RouteDecision(self.pd, i, self.pd, d, req.prompt_len - cached, cached, reason="pd")


class NaiveHeterogeneous(Policy):
    """All prefill in the PrfaaS cluster, all decode in the PD cluster; no length routing."""

    name = "naive-heterogeneous"

    def __init__(
        self, prfaas: str = "prfaas", pd: str = "pd", affinity_slack_s: float = 1.0
    ) -> None:
        self.prfaas, self.pd = prfaas, pd
        self.affinity_slack_s = affinity_slack_s

    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:
        cached = state.cached_prefix(self.prfaas, req)
        i = _pick_prefill(
            state.clusters[self.prfaas], req, state.now, self.affinity_slack_s, cached
        )
        d = _pick_decode(state.clusters[self.pd])
        return RouteDecision(
            self.prfaas, i, self.pd, d, req.prompt_len - cached, cached, reason="all-prfaas"
        )


@dataclass
class ShortTermAdaptation:
    """Paper §scheduling, short term: when PrfaaS egress utilisation nears ``util_hi``, the link
    capacity estimate moves by more than ``capacity_change``, or one prefill side's queue surges past
    ``surge_s`` seconds of backlog per instance, re-search t with the planner over the recent
    post-match length window.  ``fleet`` holds profiles and the output length; instance counts and
    link bandwidth come from the state at search time.  With ``observed_search`` the first search runs
    as soon as ``min_samples`` post-match lengths are observed, whatever the signals: the planned t
    (over the deployment's prior length law) gives way to one over the lengths actually seen."""

    fleet: Fleet
    util_hi: float = 0.8
    capacity_change: float = 0.15
    surge_s: float = 10.0
    cooldown_s: float = 10.0
    min_samples: int = 200
    grid_points: int = 256
    bandwidth_headroom: float = 0.9  # plan with this share of the estimated link capacity
    util_smoothing: float = 0.1  # EWMA weight of each new utilisation reading
    observed_search: bool = True
    util_ewma: float = 0.0
    last_search_s: float = -INF
    last_capacity: float | None = None
    searches: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.util_hi <= 1 and self.capacity_change > 0 and self.surge_s > 0):
            raise ValueError("need 0 < util_hi <= 1, capacity_change > 0 and surge_s > 0")
        if self.cooldown_s < 0 or self.min_samples < 2 or self.grid_points < 2:
            raise ValueError("need cooldown_s >= 0, min_samples >= 2 and grid_points >= 2")
        if not (0 < self.bandwidth_headroom <= 1 and 0 < self.util_smoothing <= 1):
            raise ValueError("need 0 < bandwidth_headroom <= 1 and 0 < util_smoothing <= 1")


@dataclass
class LongTermRebalancing:
    """Paper §scheduling, long term: every ``period_s``, if decode is the bottleneck (decode requests
    waiting per slot above ``decode_wait_hi`` while prefill backlog per instance is below ``prefill_lo_s``)
    switch one PD-P node to PD-D; if prefill is (backlog above ``prefill_hi_s`` and decode slots used
    below ``decode_util_lo`` of what would remain) switch one PD-D node to PD-P.  Keeps at least
    ``min_each`` nodes per role.

    Hysteresis, so roles do not flap: a switch needs the same imbalance on ``confirm`` consecutive
    checks; none starts while another node is still switching; a switch in the opposite direction of
    the last one waits ``reverse_after_s`` after it.  With ``planner_guided`` (and the short-term
    search's fleet), the planner's best split at the observed lengths and outputs also calls for a
    switch when the queues lean the same way (milder than the thresholds above)."""

    period_s: float = 60.0
    decode_wait_hi: float = 0.1
    prefill_lo_s: float = 1.0
    prefill_hi_s: float = 5.0
    decode_util_lo: float = 0.7
    min_each: int = 1
    confirm: int = 2
    reverse_after_s: float = 600.0
    planner_guided: bool = True
    planner_gain: float = 0.05  # the planner must predict this much more Λ_max for a switch
    last_s: float = -INF
    streak: int = 0
    streak_to: Role | None = None
    last_switch: tuple[float, Role] | None = None
    switches: int = 0

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.min_each < 1 or not 0 < self.decode_util_lo <= 1:
            raise ValueError("need period_s > 0, min_each >= 1 and 0 < decode_util_lo <= 1")
        if self.confirm < 1 or self.reverse_after_s < 0:
            raise ValueError("need confirm >= 1 and reverse_after_s >= 0")


class PrfaaSPolicy(Policy):
    """Length-threshold routing between a PrfaaS cluster and a PD cluster.

    ``cache_mode``: ``"oblivious"`` routes on the prompt length (the computing cluster still reuses
    its own cache); ``"scarce"`` on ``l_total - l_pd``; ``"abundant"`` on ``l_total - max(l_prfaas,
    l_pd)`` and copies the longer prefix to the computing cluster; ``"auto"`` is abundant while the
    PrfaaS→PD link utilisation is below ``abundant_util`` and scarce otherwise.  ``threshold=None``
    with ``adaptive`` starts from the first search.
    """

    def __init__(
        self,
        threshold: float | None,
        prfaas: str = "prfaas",
        pd: str = "pd",
        cache_mode: str = "scarce",
        abundant_util: float = 0.5,
        adaptive: ShortTermAdaptation | None = None,
        rebalance: LongTermRebalancing | None = None,
        affinity_slack_s: float = 1.0,
        name: str | None = None,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
        if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
        if threshold is None and adaptive is None:
            raise ValueError("a fixed-threshold PrfaaS policy needs a threshold")
        if not 0 <= abundant_util <= 1:
            raise ValueError("abundant_util must be in [0, 1]")
        self.threshold = threshold
        self.prfaas, self.pd = prfaas, pd
        self.cache_mode = cache_mode
        self.abundant_util = abundant_util
        self.adaptive = adaptive
        self.rebalance = rebalance
        self.affinity_slack_s = affinity_slack_s
        self.history: list[tuple[float, float | None, str]] = []
        self._force_search = False
        parts = ["prfaas", "adaptive" if adaptive else "fixed"]
        if cache_mode != "scarce":
            parts.append(cache_mode)
        if rebalance:
            parts.append("rebalance")
        self.name = name or "-".join(parts)

    # ---- routing ---------------------------------------------------------------------------
    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:
        t = self.threshold if self.threshold is not None else INF
        L = req.prompt_len
        l_f = state.cached_prefix(self.prfaas, req)
        l_p = state.cached_prefix(self.pd, req)
        mode = self.cache_mode
        if mode == "auto":
            link = state.links.get((self.prfaas, self.pd))
            scarce = link is not None and link.utilisation >= self.abundant_util
            mode = "scarce" if scarce else "abundant"
        copy_from, copy_tokens = None, 0
        if mode == "oblivious":
            to_prfaas = t < L
            cached = l_f if to_prfaas else l_p
        elif mode == "scarce":
            to_prfaas = L - l_p > t
            cached = l_f if to_prfaas else l_p
        else:  # abundant
            best = max(l_f, l_p)
            to_prfaas = L - best > t
            cached = best
            local = l_f if to_prfaas else l_p
            if best > local:
                copy_from = self.pd if to_prfaas else self.prfaas
                copy_tokens = best - local
        if to_prfaas and state.clusters[self.prfaas].prefill.least_loaded() < 0:
            to_prfaas, cached, copy_from, copy_tokens = False, l_p, None, 0
        where = self.prfaas if to_prfaas else self.pd
        own = cached - copy_tokens
        i = _pick_prefill(state.clusters[where], req, state.now, self.affinity_slack_s, own)
        d = _pick_decode(state.clusters[self.pd])
        reason = f"{mode}: uncached {L - cached} {'>' if to_prfaas else '<='} t={t:g}"
        return RouteDecision(
            where, i, self.pd, d, L - cached, cached, copy_from, copy_tokens, reason
        )

    # ---- adaptation ------------------------------------------------------------------------
    def on_tick(self, now: float, state: SystemState) -> list[RoleSwitch]:
        actions: list[RoleSwitch] = []
        if self.rebalance is not None:
            actions = self._rebalance(now, state)
            if actions:
                self._force_search = True
        if self.adaptive is not None:
            self._adapt(now, state)
        return actions

    def _counts(self, state: SystemState) -> tuple[int, int, int]:
        f = state.clusters[self.prfaas].prefill
        pd = state.clusters[self.pd]
        n_f = len(f.active()) if f is not None else 0
        n_p = sum(1 for r in pd.roles if r is Role.PREFILL)
        n_d = sum(1 for r in pd.roles if r is Role.DECODE)
        return n_f, n_p, n_d

    def _adapt(self, now: float, state: SystemState) -> None:
        a = self.adaptive
        link = state.links.get((self.prfaas, self.pd))
        cap = link.capacity_gbps if link is not None else a.fleet.link_gbps
        if a.last_capacity is None:
            a.last_capacity = cap
        if link is not None:
            a.util_ewma += a.util_smoothing * (link.utilisation - a.util_ewma)
        why = ""
        if self.threshold is None:
            why = "initial"
        elif a.observed_search and a.searches == 0:
            why = "observed lengths"
        elif self._force_search:
            why = "roles changed"
        elif (
            a.last_capacity is not None
            and abs(cap - a.last_capacity) > a.capacity_change * a.last_capacity
        ):
            why = f"link capacity {a.last_capacity:.1f}->{cap:.1f} Gbps"
        elif a.util_ewma >= a.util_hi:
            why = f"egress utilisation {a.util_ewma:.2f}"
        else:
            f = state.clusters[self.prfaas].prefill
            p = state.clusters[self.pd].prefill
            nf, np_ = len(f.active()), len(p.active()) if p is not None else 0
            bf = f.backlog_s(now) / nf if nf else 0.0
            bp = p.backlog_s(now) / np_ if np_ else 0.0
            if max(bf, bp) > a.surge_s:
                why = f"queue surge {bf:.1f}s/{bp:.1f}s per instance"
        if (
            not why
            or now - a.last_search_s < a.cooldown_s
            or len(state.recent_uncached) < a.min_samples
        ):
            return
        dist, fleet, grid = self._observed(state, cap)
        new = best_threshold(dist, fleet, grid).threshold
        a.last_search_s = now
        a.last_capacity = cap
        a.searches += 1
        self._force_search = False
        if new != self.threshold:
            self.history.append((now, new, why))
        self.threshold = new

    def _observed(self, state: SystemState, cap: float) -> tuple[Empirical, Fleet, np.ndarray]:
        """The planner's inputs as observed now: the recent post-match lengths, the fleet at the
        current instance counts, ``bandwidth_headroom`` × the link estimate and the mean output of
        the recently finished requests (the fleet's own output length until enough have finished)."""
        a = self.adaptive
        samples = np.fromiter(state.recent_uncached, dtype=float)
        n_f, n_p, n_d = self._counts(state)
        outs = state.recent_output
        out_len = a.fleet.output_len
        if len(outs) >= max(2, a.min_samples // 4):
            out_len = max(float(np.mean(np.fromiter(outs, dtype=float))), 1.0)
        fleet = replace(
            a.fleet,
            n_prfaas=n_f,
            n_p=n_p,
            n_d=max(n_d, 0),
            link_gbps=max(cap * a.bandwidth_headroom, 1e-3),
            output_len=out_len,
        )
        grid = np.unique(np.quantile(samples, np.linspace(0, 1, a.grid_points)))
        return Empirical(samples), fleet, np.concatenate([[0.0], grid])

    def _rebalance(self, now: float, state: SystemState) -> list[RoleSwitch]:
        rb = self.rebalance
        if now - rb.last_s < rb.period_s:
            return []
        rb.last_s = now
        pd = state.clusters[self.pd]
        if pd.prefill is None or pd.decode is None:
            return []
        if any(x is not None for x in pd.switching):
            rb.streak, rb.streak_to = 0, None
            return []
        want = self._imbalance(now, pd) or self._planned_imbalance(now, state, pd)
        if want is None:
            rb.streak, rb.streak_to = 0, None
            return []
        to, i, why = want
        rb.streak = rb.streak + 1 if rb.streak_to is to else 1
        rb.streak_to = to
        if rb.streak < rb.confirm:
            return []
        if (
            rb.last_switch is not None
            and rb.last_switch[1] is not to
            and now - rb.last_switch[0] < rb.reverse_after_s
        ):
            return []
        rb.streak, rb.streak_to = 0, None
        rb.last_switch = (now, to)
        rb.switches += 1
        return [RoleSwitch(self.pd, i, to, why)]

    def _imbalance(self, now: float, pd: ClusterState) -> tuple[Role, int, str] | None:
        """The switch the PD cluster's queues call for now (role, node, reason), or None."""
        rb = self.rebalance
        n_p = sum(1 for r in pd.roles if r is Role.PREFILL)
        n_d = sum(1 for r in pd.roles if r is Role.DECODE)
        pool, dpool = pd.prefill, pd.decode
        active_p = pool.active()
        backlog = pool.backlog_s(now) / len(active_p) if active_p else INF
        slots = sum(dpool.bs_max)
        wait_per_slot = sum(dpool.waiting) / slots if slots else INF
        decode_bound = wait_per_slot > rb.decode_wait_hi and backlog < rb.prefill_lo_s
        if decode_bound and n_p > rb.min_each and active_p:
            i = min(active_p, key=lambda k: pool.busy_until[k])
            return Role.DECODE, i, f"decode waiting {wait_per_slot:.2f}/slot"
        bs = max(dpool.bs_max) if slots else 0
        if backlog > rb.prefill_hi_s and n_d > rb.min_each and bs:
            used = sum(dpool.slots_used)
            if used <= rb.decode_util_lo * (slots - bs):
                cands = [
                    k for k, ld in enumerate(dpool.load) if ld != INF and pd.roles[k] is Role.DECODE
                ]
                if cands:
                    k = min(cands, key=lambda j: dpool.load[j])
                    return Role.PREFILL, k, f"prefill backlog {backlog:.1f}s"
        return None

    def _planned_imbalance(
        self, now: float, state: SystemState, pd: ClusterState
    ) -> tuple[Role, int, str] | None:
        """Paper: Θ_prfaas + Θ_pd-p ≪ Θ_pd-d (or the reverse) at the observed lengths and outputs.
        The planner (Eqs. 3-8, best t) at one PD node more or less in the prefill role tells the
        direction when it predicts ``planner_gain`` more Λ_max; a switch also needs queues that show
        it (prefill backlog above ``prefill_lo_s`` with decode slack, or requests waiting for
        decode slots)."""
        rb, a = self.rebalance, self.adaptive
        if not rb.planner_guided or a is None or len(state.recent_uncached) < a.min_samples:
            return None
        link = state.links.get((self.prfaas, self.pd))
        cap = link.capacity_gbps if link is not None else a.fleet.link_gbps
        dist, fleet, grid = self._observed(state, cap)
        n_p, n_d = fleet.n_p, fleet.n_d
        if fleet.n_prfaas == 0 and n_p == 0:
            return None

        def lam(k: int) -> float:  # the planner's Λ_max with k PD-P nodes (best t)
            f = replace(fleet, n_p=k, n_d=n_p + n_d - k)
            if f.n_prfaas == 0 and k == 0:
                return 0.0
            return best_threshold(dist, f, grid).lambda_max

        here = lam(n_p) * (1 + rb.planner_gain)
        more_p = n_d > rb.min_each and lam(n_p + 1) > here
        fewer_p = not more_p and n_p > rb.min_each and lam(n_p - 1) > here
        if not (more_p or fewer_p):
            return None
        best = replace(fleet, n_p=n_p + 1 if more_p else n_p - 1)
        pool, dpool = pd.prefill, pd.decode
        active_p = pool.active()
        backlog = pool.backlog_s(now) / len(active_p) if active_p else INF
        slots = sum(dpool.bs_max)
        bs = max(dpool.bs_max) if slots else 0
        slack = bs and sum(dpool.slots_used) <= rb.decode_util_lo * (slots - bs)
        if best.n_p > n_p and n_d > rb.min_each and backlog > rb.prefill_lo_s and slack:
            cands = [
                k for k, ld in enumerate(dpool.load) if ld != INF and pd.roles[k] is Role.DECODE
            ]
            if cands:
                k = min(cands, key=lambda j: dpool.load[j])
                return Role.PREFILL, k, f"planner: N_p {n_p}->{best.n_p}, backlog {backlog:.1f}s"
        if best.n_p < n_p and n_p > rb.min_each and sum(dpool.waiting) > 0 and active_p:
            i = min(active_p, key=lambda k: pool.busy_until[k])
            return Role.DECODE, i, f"planner: N_p {n_p}->{best.n_p}, decode waiting"
        return None


POLICY_NAMES = ("prfaas", "homogeneous", "naive")


def make_policy(
    kind: str = "prfaas",
    threshold: float | None = None,
    *,
    fleet: Fleet | None = None,
    prior: LengthDist | None = None,
    adaptive: bool | ShortTermAdaptation | None = None,
    rebalance: bool | LongTermRebalancing | None = None,
    prfaas: str = "prfaas",
    pd: str = "pd",
    cache_mode: str = "scarce",
    grid=None,
    **kw,
) -> Policy:
    """The one factory of routing policies, for the simulator and the live router (``kind``).

    ``homogeneous`` / ``naive``: the baselines.  ``prfaas`` is the paper's whole scheduler by default:
    the initial t from the planner (``best_threshold`` over ``prior``, the deployment's expected
    post-match length law, at ``fleet``'s profiles, split and link), the short-term re-search of t
    (:class:`ShortTermAdaptation`: first over the observed lengths, then on egress utilisation, link
    capacity and queue-surge signals) and long-term P/D role rebalancing (:class:`LongTermRebalancing`).
    A ``threshold`` fixes t and turns the short-term search off (unless ``adaptive`` is given);
    ``rebalance=False`` turns rebalancing off.  ``adaptive`` / ``rebalance`` may be objects carrying
    their own settings.  ``adaptive`` (the old name) is ``prfaas`` with the short-term search on.
    Other keywords go to the policy's constructor (``affinity_slack_s``, ``abundant_util``, ``name``).
    """
    if kind in ("homogeneous", "homogeneous-pd"):
        return HomogeneousPD(pd=pd, **kw)
    if kind in ("naive", "naive-heterogeneous"):
        return NaiveHeterogeneous(prfaas=prfaas, pd=pd, **kw)
    if kind not in ("prfaas", "prfaas-fixed", "adaptive", "prfaas-adaptive"):
        raise ValueError(f"unknown policy {kind!r} ({', '.join(POLICY_NAMES)})")
    if adaptive is None:
        adaptive = kind in ("adaptive", "prfaas-adaptive") or (
            threshold is None and kind == "prfaas"
        )
    if rebalance is None:
        rebalance = threshold is None and kind == "prfaas"
    if adaptive is True:
        if fleet is None:
            raise ValueError("the short-term threshold search needs fleet= (profiles, link)")
        adaptive = ShortTermAdaptation(fleet)
    if rebalance is True:
        rebalance = LongTermRebalancing()
    if threshold is None:
        if fleet is None or prior is None:
            if not adaptive:
                raise ValueError("a PrfaaS policy needs a threshold, or fleet= and prior=")
        else:
            threshold = planned_threshold(prior, fleet, grid)
    return PrfaaSPolicy(
        threshold,
        prfaas=prfaas,
        pd=pd,
        cache_mode=cache_mode,
        adaptive=adaptive or None,
        rebalance=rebalance or None,
        **kw,
    )


def planned_threshold(prior: LengthDist, fleet: Fleet, grid=None) -> float:
    """The planner's t for ``fleet`` (its split and link) over the length law ``prior``."""
    if fleet.n_prfaas == 0 or fleet.n_p == 0:
        raise ValueError("a PrfaaS threshold needs PrfaaS and PD-P instances in the fleet")
    t = best_threshold(prior, fleet, grid).threshold
    if t is None:  # pragma: no cover - best_threshold with both kinds always returns a t
        raise ValueError("the planner found no threshold")
    return float(t)
