"""A live deployment as the simulator sees it: the same clusters, nodes, links and hardware profile.

:func:`deployment_from_topology` builds a :class:`~prfaas.sim.deployment.Deployment` from a
:class:`~prfaas.scheduling.live.Topology` (what the live router observes); :func:`deployment_from_config`
reads a deployment config (``prfaas/configs/deploy_*.yaml``, duck-typed) and fills in the node's
hand-off from its engine settings: the model's MLA layers (``kv_layers``), the prefill chunk
(``max_num_batched_tokens``), the links' one-way latency (RTT/2) and the decode slots
(``max_num_seqs``).  The nodes' own hand-off costs (the prefill node's export, the decode node's
import) come from the hardware profile where ``prfaas profile`` measured them."""

from __future__ import annotations

from prfaas.scheduling.live import Topology, decode_profile, deployment_topology
from prfaas.scheduling.profile import HardwareProfile
from prfaas.scheduling.types import Role
from prfaas.sim.deployment import ClusterSpec, Deployment, LinkSpec


def _or(given: float | None, profiled: float | None) -> float:
    return float(given if given is not None else profiled or 0.0)


def deployment_from_topology(
    topo: Topology,
    profile: HardwareProfile,
    bs_max: int,
    kv_layers: int = 0,
    chunk_tokens: int = 0,
    export_gbps: float | None = None,
    import_gbps: float | None = None,
    import_fixed_s: float | None = None,
    cache_blocks: int = 0,
    rdma_gbps: float = 800.0,
) -> Deployment:
    """Every node runs ``profile``; a PD cluster's nodes must list its prefill nodes first (the
    simulator's instance order).  The hand-off's node costs are the profile's (``export_gbps``,
    ``import_gbps``, ``import_fixed_s``; free where it has none) unless given."""
    export_gbps = _or(export_gbps, profile.export_gbps)
    import_gbps = _or(import_gbps, profile.import_gbps)
    import_fixed_s = _or(import_fixed_s, profile.import_fixed_s)
    dec = decode_profile(profile, bs_max)
    clusters = []
    for name, kind, roles in topo.clusters:
        n_p = sum(r is Role.PREFILL for r in roles)
        if list(roles) != [Role.PREFILL] * n_p + [Role.DECODE] * (len(roles) - n_p):
            raise ValueError(f"cluster {name!r}: list the prefill nodes before the decode nodes")
        clusters.append(
            ClusterSpec(
                name,
                kind,
                n_p,
                len(roles) - n_p,
                profile,
                dec if kind == "pd" else None,
                cache_blocks,
                rdma_gbps,
                kv_layers=kv_layers,
                chunk_tokens=chunk_tokens,
                export_gbps=export_gbps,
                import_gbps=import_gbps,
                import_fixed_s=import_fixed_s,
            )
        )
    links = tuple(
        LinkSpec(src, dst, gbps, latency_s=rtt_ms / 2000) for src, dst, gbps, rtt_ms in topo.links
    )
    return Deployment(tuple(clusters), links)


def deployment_from_config(cfg, profile: HardwareProfile, **costs) -> Deployment:
    """The simulator's view of a deployment config running ``profile`` (see the module docstring);
    ``costs``: ``export_gbps``, ``import_gbps``, ``import_fixed_s``, ``cache_blocks``."""
    from prfaas.model.config import PRESETS

    ecfg = cfg.engine_config("decode")
    model = PRESETS.get(cfg.model)
    layers = len(model.full_attn_layers) if model is not None else 0
    return deployment_from_topology(
        deployment_topology(cfg),
        profile,
        ecfg.max_num_seqs,
        kv_layers=layers,
        chunk_tokens=ecfg.max_num_batched_tokens,
        **costs,
    )
