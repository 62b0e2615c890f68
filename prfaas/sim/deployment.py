"""What the simulator simulates: clusters (instances, profiles, prefix caches) and links."""

from __future__ import annotations

from dataclasses import dataclass, field

from prfaas.scheduling.profile import HardwareProfile
from prfaas.sim.link import check_schedule


@dataclass(frozen=True)
class ClusterSpec:
    """A homogeneous cluster.  ``kind="prfaas"``: prefill-only instances.  ``kind="pd"``: nodes
    ``0..n_prefill-1`` start as PD-P, the next ``n_decode`` as PD-D; nodes can switch roles when both
    profiles are given."""

    name: str
    kind: str
    n_prefill: int
    n_decode: int = 0
    prefill_profile: HardwareProfile | None = None
    decode_profile: HardwareProfile | None = None
    cache_blocks: int = 0  # prefix-cache capacity in hash blocks (0: no prefix cache)
    rdma_gbps: float = 800.0  # intra-cluster KV transfer bandwidth per transfer
    # the node's hand-off (docs/simulator.md "Hand-off"): layer-wise streaming sends layer i while
    # layer i+1 computes, during the last prefill chunk; the last layer's KV leaves after the prefill
    kv_layers: int = 0  # layers whose KV grows with length (MLA); 0: no last-layer tail modelled
    chunk_tokens: int = 0  # prefill chunk (token budget) of a node; 0: one pass over the prompt
    export_gbps: float = 0.0  # prefill node: device -> host staging rate of the KV (0: free)
    import_gbps: float = 0.0  # decode node: rate the received KV goes into the cache (0: free)
    import_fixed_s: float = 0.0  # decode node: fixed cost per received request (import set-up)

    def __post_init__(self) -> None:
        if self.kind not in ("prfaas", "pd"):
            raise ValueError(
                f"cluster {self.name!r}: kind must be 'prfaas' or 'pd', got {self.kind!r}"
            )
        if self.n_prefill < 0 or self.n_decode < 0 or self.n_prefill + self.n_decode == 0:
            raise ValueError(f"cluster {self.name!r}: needs >= 1 instance and no negative counts")
        if self.n_prefill and self.prefill_profile is None:
            raise ValueError(f"cluster {self.name!r}: prefill instances need a prefill_profile")
        if self.kind == "prfaas" and self.n_decode:
            raise ValueError(f"cluster {self.name!r}: a PrfaaS cluster has no decode instances")
        if self.n_decode and (self.decode_profile is None or not self.decode_profile.has_decode):
            raise ValueError(
                f"cluster {self.name!r}: decode instances need a decode profile (bs_max, t_decode_s)"
            )
        if self.cache_blocks < 0 or not self.rdma_gbps > 0:
            raise ValueError(f"cluster {self.name!r}: cache_blocks >= 0 and rdma_gbps > 0 required")
        if (
            min(self.kv_layers, self.chunk_tokens) < 0
            or min(self.export_gbps, self.import_gbps, self.import_fixed_s) < 0
        ):
            raise ValueError(f"cluster {self.name!r}: hand-off parameters must be >= 0")

    @property
    def n_nodes(self) -> int:
        return self.n_prefill + self.n_decode


@dataclass(frozen=True)
class LinkSpec:
    """A directed cross-cluster link; ``schedule`` steps the bandwidth: ``((start_s, gbps), ...)``."""

    src: str
    dst: str
    gbps: float
    schedule: tuple[tuple[float, float], ...] = ()
    latency_s: float = 0.0  # one-way propagation delay added to every transfer's end

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"link {self.src}->{self.dst}: latency_s must be >= 0")
        object.__setattr__(self, "schedule", tuple(check_schedule(self.gbps, self.schedule)))


@dataclass(frozen=True)
class Deployment:
    clusters: tuple[ClusterSpec, ...]
    links: tuple[LinkSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        names = [c.name for c in self.clusters]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"deployment needs >= 1 cluster with unique names, got {names}")
        pairs = [(lk.src, lk.dst) for lk in self.links]
        if len(set(pairs)) != len(pairs):
            raise ValueError("at most one link per (src, dst)")
        for lk in self.links:
            if lk.src not in names or lk.dst not in names or lk.src == lk.dst:
                raise ValueError(f"link {lk.src}->{lk.dst} must join two different known clusters")

    def cluster(self, name: str) -> ClusterSpec:
        for c in self.clusters:
            if c.name == name:
                return c
        raise ValueError(f"no cluster named {name!r}")
