"""Routing policies: one factory (:func:`make_policy`) for the simulator and the live router.

The policies themselves live in modules named for what they hold: :mod:`~prfaas.scheduling.policy_base`
(the :class:`Policy` interface, instance picking), :mod:`~prfaas.scheduling.baseline_policies`
(homogeneous PD, naive heterogeneous), :mod:`~prfaas.scheduling.prfaas_policy` (length-threshold
routing, cache-aware), :mod:`~prfaas.scheduling.threshold_search` (short-term re-search of t) and
:mod:`~prfaas.scheduling.role_rebalancing` (long-term role switches); they are re-exported here.
"""

from __future__ import annotations

from prfaas.scheduling.baseline_policies import HomogeneousPD, NaiveHeterogeneous
from prfaas.scheduling.lengths import LengthDist
from prfaas.scheduling.planner import Fleet, best_threshold
from prfaas.scheduling.policy_base import Policy
from prfaas.scheduling.prfaas_policy import CACHE_MODES, PrfaaSPolicy
from prfaas.scheduling.role_rebalancing import LongTermRebalancing
from prfaas.scheduling.threshold_search import ShortTermAdaptation

__all__ = [
    "CACHE_MODES",
    "POLICY_NAMES",
    "HomogeneousPD",
    "LongTermRebalancing",
    "NaiveHeterogeneous",
    "Policy",
    "PrfaaSPolicy",
    "ShortTermAdaptation",
    "make_policy",
    "planned_threshold",
]

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
