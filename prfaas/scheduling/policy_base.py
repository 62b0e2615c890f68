"""What every routing policy shares: the :class:`Policy` interface and the choice of an instance
inside a cluster.

A policy reads a :class:`~prfaas.scheduling.types.RequestInfo` and the observable
:class:`~prfaas.scheduling.types.SystemState` and returns a
:class:`~prfaas.scheduling.types.RouteDecision`; ``on_tick`` lets it adapt and returns role-switch
actions.  Instances are picked by least load: prefill by the earliest estimated queue drain, with
prefix-cache affinity when the cache owner is within ``affinity_slack_s`` seconds of it; decode by
the fewest assigned requests per slot.
"""

from __future__ import annotations

from prfaas.scheduling.types import (
    INF,
    ClusterState,
    RequestInfo,
    Role,
    RoleSwitch,
    RouteDecision,
    SystemState,
)


def pick_prefill(
    cs: ClusterState, req: RequestInfo, now: float, affinity_slack_s: float, cached: int
) -> int:
    """The prefill instance of ``cs`` for ``req`` (``cached``: prefix tokens the cluster holds)."""
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


def pick_decode(cs: ClusterState) -> int:
    """The least-loaded decode instance of ``cs``."""
    if cs.decode is None:
        raise ValueError(f"cluster {cs.name!r} has no decode instances")
    d = cs.decode.least_loaded()
    if d < 0:
        raise ValueError(f"cluster {cs.name!r}: no decode instance accepts work")
    return d


def role_counts(state: SystemState, prfaas: str, pd: str) -> tuple[int, int, int]:
    """(PrfaaS instances taking work, PD nodes in the prefill role, PD nodes in the decode role)."""
    f = state.clusters[prfaas].prefill
    cs = state.clusters[pd]
    n_f = len(f.active()) if f is not None else 0
    n_p = sum(1 for r in cs.roles if r is Role.PREFILL)
    n_d = sum(1 for r in cs.roles if r is Role.DECODE)
    return n_f, n_p, n_d


class Policy:
    """Base class: ``decide`` routes a request, ``on_tick`` adapts (default: nothing)."""

    name = "policy"
    threshold: float | None = None

    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:  # pragma: no cover
        raise NotImplementedError

    def on_tick(self, now: float, state: SystemState) -> list[RoleSwitch]:
        return []
