"""The PrfaaS routing policy: length-threshold routing between a PrfaaS cluster and a PD cluster,
cache-aware (the paper's scarce / abundant bandwidth rules), with the short-term threshold search
(:mod:`~prfaas.scheduling.threshold_search`) and long-term role rebalancing
(:mod:`~prfaas.scheduling.role_rebalancing`) it runs on every tick."""

from __future__ import annotations

import math

from prfaas.scheduling.policy_base import Policy, pick_decode, pick_prefill, role_counts
from prfaas.scheduling.role_rebalancing import LongTermRebalancing
from prfaas.scheduling.threshold_search import ShortTermAdaptation
from prfaas.scheduling.types import INF, RequestInfo, RoleSwitch, RouteDecision, SystemState

CACHE_MODES = ("oblivious", "scarce", "abundant", "auto")


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
        i = pick_prefill(state.clusters[where], req, state.now, self.affinity_slack_s, own)
        d = pick_decode(state.clusters[self.pd])
        reason = f"{mode}: uncached {L - cached} {'>' if to_prfaas else '<='} t={t:g}"
        return RouteDecision(
            where, i, self.pd, d, L - cached, cached, copy_from, copy_tokens, reason
        )

    # ---- adaptation ------------------------------------------------------------------------
    def on_tick(self, now: float, state: SystemState) -> list[RoleSwitch]:
        actions: list[RoleSwitch] = []
        if self.rebalance is not None:
            actions = self.rebalance.check(now, state, self.prfaas, self.pd, self.adaptive)
            if actions:
                self._force_search = True
        if self.adaptive is not None:
            self._adapt(now, state)
        return actions

    def _counts(self, state: SystemState) -> tuple[int, int, int]:
        return role_counts(state, self.prfaas, self.pd)

    def _adapt(self, now: float, state: SystemState) -> None:
        found = self.adaptive.step(
            now, state, self.threshold, self._force_search, self.prfaas, self.pd
        )
        if found is None:
            return
        new, why = found
        self._force_search = False
        if new != self.threshold:
            self.history.append((now, new, why))
        self.threshold = new
