"""The paper's long-term scheduling: switch PD nodes between the prefill and decode roles when one
side is the bottleneck, with hysteresis so roles do not flap (:class:`LongTermRebalancing`, held by
:class:`~prfaas.scheduling.prfaas_policy.PrfaaSPolicy`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prfaas.scheduling.planner import best_threshold
from prfaas.scheduling.types import INF, ClusterState, Role, RoleSwitch, SystemState

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.scheduling.threshold_search import ShortTermAdaptation


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

    def check(
        self,
        now: float,
        state: SystemState,
        prfaas: str,
        pd: str,
        adaptive: ShortTermAdaptation | None = None,
    ) -> list[RoleSwitch]:
        """One tick: the role switch of PD cluster ``pd`` that is due now, if any."""
        if now - self.last_s < self.period_s:
            return []
        self.last_s = now
        cs = state.clusters[pd]
        if cs.prefill is None or cs.decode is None:
            return []
        if any(x is not None for x in cs.switching):
            self.streak, self.streak_to = 0, None
            return []
        want = self.imbalance(now, cs) or self.planned_imbalance(now, state, cs, prfaas, adaptive)
        if want is None:
            self.streak, self.streak_to = 0, None
            return []
        to, i, why = want
        self.streak = self.streak + 1 if self.streak_to is to else 1
        self.streak_to = to
        if self.streak < self.confirm:
            return []
        if (
            self.last_switch is not None
            and self.last_switch[1] is not to
            and now - self.last_switch[0] < self.reverse_after_s
        ):
            return []
        self.streak, self.streak_to = 0, None
        self.last_switch = (now, to)
        self.switches += 1
        return [RoleSwitch(pd, i, to, why)]

    def imbalance(self, now: float, pd: ClusterState) -> tuple[Role, int, str] | None:
        """The switch the PD cluster's queues call for now (role, node, reason), or None."""
        n_p = sum(1 for r in pd.roles if r is Role.PREFILL)
        n_d = sum(1 for r in pd.roles if r is Role.DECODE)
        pool, dpool = pd.prefill, pd.decode
        active_p = pool.active()
        backlog = pool.backlog_s(now) / len(active_p) if active_p else INF
        slots = sum(dpool.bs_max)
        wait_per_slot = sum(dpool.waiting) / slots if slots else INF
        decode_bound = wait_per_slot > self.decode_wait_hi and backlog < self.prefill_lo_s
        if decode_bound and n_p > self.min_each and active_p:
            i = min(active_p, key=lambda k: pool.busy_until[k])
            return Role.DECODE, i, f"decode waiting {wait_per_slot:.2f}/slot"
        bs = max(dpool.bs_max) if slots else 0
        if backlog > self.prefill_hi_s and n_d > self.min_each and bs:
            used = sum(dpool.slots_used)
            if used <= self.decode_util_lo * (slots - bs):
                cands = [
                    k for k, ld in enumerate(dpool.load) if ld != INF and pd.roles[k] is Role.DECODE
                ]
                if cands:
                    k = min(cands, key=lambda j: dpool.load[j])
                    return Role.PREFILL, k, f"prefill backlog {backlog:.1f}s"
        return None

    def planned_imbalance(
        self,
        now: float,
        state: SystemState,
        pd: ClusterState,
        prfaas: str,
        a: ShortTermAdaptation | None,
    ) -> tuple[Role, int, str] | None:
        """Paper: Θ_prfaas + Θ_pd-p ≪ Θ_pd-d (or the reverse) at the observed lengths and outputs.
        The planner (Eqs. 3-8, best t) at one PD node more or less in the prefill role tells the
        direction when it predicts ``planner_gain`` more Λ_max; a switch also needs queues that show
        it (prefill backlog above ``prefill_lo_s`` with decode slack, or requests waiting for
        decode slots)."""
        if not self.planner_guided or a is None or len(state.recent_uncached) < a.min_samples:
            return None
        cap = a.link_capacity(state, prfaas, pd.name)
        dist, fleet, grid = a.observed(state, cap, prfaas, pd.name)
        n_p, n_d = fleet.n_p, fleet.n_d
        if fleet.n_prfaas == 0 and n_p == 0:
            return None

        def lam(k: int) -> float:  # the planner's Λ_max with k PD-P nodes (best t)
            f = replace(fleet, n_p=k, n_d=n_p + n_d - k)
            if f.n_prfaas == 0 and k == 0:
                return 0.0
            return best_threshold(dist, f, grid).lambda_max

        here = lam(n_p) * (1 + self.planner_gain)
        more_p = n_d > self.min_each and lam(n_p + 1) > here
        fewer_p = not more_p and n_p > self.min_each and lam(n_p - 1) > here
        if not (more_p or fewer_p):
            return None
        best = replace(fleet, n_p=n_p + 1 if more_p else n_p - 1)
        pool, dpool = pd.prefill, pd.decode
        active_p = pool.active()
        backlog = pool.backlog_s(now) / len(active_p) if active_p else INF
        slots = sum(dpool.bs_max)
        bs = max(dpool.bs_max) if slots else 0
        slack = bs and sum(dpool.slots_used) <= self.decode_util_lo * (slots - bs)
        if best.n_p > n_p and n_d > self.min_each and backlog > self.prefill_lo_s and slack:
            cands = [
                k for k, ld in enumerate(dpool.load) if ld != INF and pd.roles[k] is Role.DECODE
            ]
            if cands:
                k = min(cands, key=lambda j: dpool.load[j])
                return Role.PREFILL, k, f"planner: N_p {n_p}->{best.n_p}, backlog {backlog:.1f}s"
        if best.n_p < n_p and n_p > self.min_each and sum(dpool.waiting) > 0 and active_p:
            i = min(active_p, key=lambda k: pool.busy_until[k])
            return Role.DECODE, i, f"planner: N_p {n_p}->{best.n_p}, decode waiting"
        return None
