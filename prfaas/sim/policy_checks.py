"""The simulator's checks of what a policy hands back: a routing decision (:func:`check_route`)
and a role switch (:func:`check_role_switch`). One that the deployment cannot carry out raises
``ValueError`` naming it; a valid one gives the cluster indices the run works with."""

from __future__ import annotations

from prfaas.scheduling.types import INF, ClusterState, Role, RoleSwitch, RouteDecision


def check_route(
    d: RouteDecision,
    r: int,
    input_len: int,
    index: dict[str, int],
    cstates: list[ClusterState],
    link_of: dict[tuple[int, int], int],
) -> tuple[int, int]:
    """Request ``r`` (``input_len`` tokens) routed by ``d`` -> (prefill cluster, decode cluster):
    both known, with instances that take work, ``1 <= uncached_len <= input_len``, and a link
    between the two clusters when they differ."""
    c = index.get(d.prefill_cluster)
    dc = index.get(d.decode_cluster)
    pool = cstates[c].prefill if c is not None else None
    dpool = cstates[dc].decode if dc is not None else None
    if pool is None or dpool is None:
        raise ValueError(f"policy routed request {r} to unknown clusters/pools: {d}")
    i, di = d.prefill_instance, d.decode_instance
    if not (0 <= i < len(pool.busy_until)) or pool.busy_until[i] == INF:
        raise ValueError(f"policy picked a prefill instance that takes no work: {d}")
    if not (0 <= di < len(dpool.load)) or dpool.load[di] == INF:
        raise ValueError(f"policy picked a decode instance that takes no work: {d}")
    u = d.uncached_len
    if not 1 <= u <= input_len:
        raise ValueError(f"uncached_len {u} outside [1, {input_len}] for request {r}")
    if c != dc and (c, dc) not in link_of:
        raise ValueError(f"no link {d.prefill_cluster}->{d.decode_cluster} for request {r}")
    return c, dc


def check_role_switch(
    a: object,
    index: dict[str, int],
    cstates: list[ClusterState],
    switching: list[list[Role | tuple | None]],
) -> int:
    """An action from ``policy.on_tick`` -> the index of its cluster: a :class:`RoleSwitch` of an
    instance of a PD cluster with both roles, to the role it has not, not already switching."""
    if not isinstance(a, RoleSwitch):
        raise ValueError(f"on_tick must return RoleSwitch actions, got {a!r}")
    c = index.get(a.cluster)
    if (
        c is None
        or cstates[c].kind != "pd"
        or cstates[c].prefill is None
        or cstates[c].decode is None
    ):
        raise ValueError(f"role switch needs a PD cluster with both roles: {a!r}")
    roles = cstates[c].roles
    i = a.instance
    if not 0 <= i < len(roles) or roles[i] is a.to_role or switching[c][i] is not None:
        raise ValueError(f"invalid role switch {a!r}")
    return c
