"""What a router sees and decides: request view, observable state, route decisions, role switches.

The same types serve the discrete-event simulator (``prfaas.sim``) and the live HTTP router: the
simulator keeps one mutable :class:`SystemState` up to date in place; a live router fills it from its
monitors.  Policies read it and never see anything else (no future, no true service times).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.scheduling.prefix_index import PrefixIndex

BLOCK_TOKENS = 512
INF = float("inf")


class Role(enum.StrEnum):
    """Role of an instance: prefill (PrfaaS or PD-P) or decode (PD-D)."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True)
class RequestInfo:
    """What the router knows of a request at arrival."""

    request_id: int | str
    prompt_len: int
    hash_ids: tuple[int, ...] | list[int] | None = (
        None  # one id per BLOCK_TOKENS block of the prompt
    )
    output_len: int | None = None  # expected output length, if known
    arrival_s: float = 0.0


@dataclass(slots=True)
class PrefillPool:
    """Prefill instances of one cluster (index = instance id inside the cluster).

    ``busy_until`` is the router's estimate of when each instance's queue drains (absolute seconds);
    an instance that is not accepting prefill work (decode role, draining) holds ``inf`` there.
    """

    busy_until: list[float]
    queue_reqs: list[int]
    queue_tokens: list[int]

    def active(self) -> list[int]:
        return [i for i, b in enumerate(self.busy_until) if b != INF]

    def least_loaded(self) -> int:
        """Instance whose queue drains first (ties: lowest id); -1 if none accepts work."""
        b = self.busy_until
        m = min(b)
        return -1 if m == INF else b.index(m)

    def backlog_s(self, now: float) -> float:
        """Total queued prefill seconds over accepting instances."""
        return sum(x - now for x in self.busy_until if now < x != INF)


@dataclass(slots=True)
class DecodePool:
    """Decode instances of one cluster: slots in use, requests waiting for a slot, slot limit."""

    slots_used: list[int]
    waiting: list[int]
    bs_max: list[int]  # 0 for an instance that is not in the decode role
    load: list[float]  # (slots_used + waiting + pending) / bs_max, inf when not accepting

    def least_loaded(self) -> int:
        m = min(self.load)
        return -1 if m == INF else self.load.index(m)

    def utilisation(self) -> float:
        cap = sum(self.bs_max)
        return sum(self.slots_used) / cap if cap else 0.0


@dataclass(slots=True)
class LinkState:
    """Link monitor readings of one directed link between clusters."""

    src: str
    dst: str
    nominal_gbps: float
    capacity_gbps: float  # current capacity estimate (congestion monitor)
    throughput_gbps: float = 0.0  # measured over the last monitor interval
    bytes_in_flight: float = 0.0
    busy_fraction: float = 0.0  # share of the last interval with at least one transfer

    @property
    def utilisation(self) -> float:
        return self.throughput_gbps / self.capacity_gbps if self.capacity_gbps > 0 else 1.0


@dataclass(slots=True)
class ClusterState:
    """One cluster: name, kind ("prfaas" prefill-only or "pd"), pools and prefix-cache index."""

    name: str
    kind: str
    prefill: PrefillPool | None = None
    decode: DecodePool | None = None
    prefix: PrefixIndex | None = None
    roles: list[Role] = field(default_factory=list)  # PD cluster: current role per node
    switching: list[Role | None] = field(default_factory=list)  # role a node drains towards


@dataclass(slots=True)
class SystemState:
    """Observable state of the whole deployment at time ``now``."""

    now: float
    clusters: dict[str, ClusterState]
    links: dict[tuple[str, str], LinkState]
    recent_uncached: list[int] = field(default_factory=list)  # post-match lengths, recent window
    recent_output: list[int] = field(default_factory=list)  # output lengths of finished requests

    def cached_prefix(self, cluster: str, request: RequestInfo) -> int:
        """Cached prefix length (tokens) of ``request`` in ``cluster``'s prefix index (0 if none)."""
        c = self.clusters.get(cluster)
        if c is None or c.prefix is None or not request.hash_ids:
            return 0
        return c.prefix.match_tokens(request.hash_ids, request.prompt_len)


@dataclass(slots=True)
class RouteDecision:
    """Where a request goes."""

    prefill_cluster: str
    prefill_instance: int
    decode_cluster: str
    decode_instance: int
    uncached_len: int  # tokens the prefill instance computes
    cached_len: int = 0  # prefix reused (in the computing cluster, after any copy)
    copy_from: str | None = None  # cluster to copy a cached prefix from before prefill
    copy_tokens: int = 0  # prefix tokens copied across
    reason: str = ""

    @property
    def offloaded(self) -> bool:
        return self.prefill_cluster != self.decode_cluster


@dataclass(frozen=True, slots=True)
class RoleSwitch:
    """Long-term action: move a PD node to another role (takes effect after drain + switch cost)."""

    cluster: str
    instance: int
    to_role: Role
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ThresholdChange:
    """Short-term action record: the routing threshold changed."""

    old: float | None
    new: float | None
    reason: str = ""
