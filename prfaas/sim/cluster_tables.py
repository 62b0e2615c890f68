"""The per-cluster figures a simulator run reads in its event loop, computed once per run from a
:class:`~prfaas.sim.deployment.Deployment` (:func:`cluster_tables`).

Every list is indexed by the cluster's position ``c`` in ``deployment.clusters``. Units: lengths
in tokens, times in seconds, sizes in bytes, rates in bytes per second (a spec's Gbit/s × 1e9 / 8;
0 where the spec gives 0: that stage is free). The length tables cover prompts up to ``max_len``
tokens (:func:`~prfaas.scheduling.observer.length_table`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prfaas.scheduling.observer import ObservedCluster, length_table
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.types import Role
from prfaas.sim.deployment import Deployment


@dataclass
class ClusterTables:
    names: list[str]  # the clusters' names
    index: dict[str, int]  # name -> c
    kv_bytes: list[Callable[[float], float]]  # S_kv(tokens): the KV of a prefix, bytes
    kv0: list[float]  # S_kv(0): the part of the KV that does not grow with the length, bytes
    # decode step time by batch size 0..bs_max (index 0 unused, 0.0); None: the cluster decodes not
    step: list[list[float] | None]
    bs_max: list[int]  # decode slots per instance (0: the cluster decodes not)
    rdma_Bps: list[float]  # intra-cluster KV transfer rate
    # the last prefill chunk's time for an uncached length (the whole prefill below one chunk);
    # None: no chunk_tokens (the whole prefill overlaps the layer-wise stream)
    last_chunk_s: list[Callable[[int], float] | None]
    export_Bps: list[float]  # prefill node: staging rate of the KV out of its cache
    import_Bps: list[float]  # decode node: rate the received KV goes into its cache
    import_fixed_s: list[float]  # decode node: fixed cost per received request
    kv_layers: list[int]  # layers whose KV grows with the length (0: no last-layer tail)
    observed: list[ObservedCluster]  # what the run's ClusterObserver is built from


def cluster_tables(dep: Deployment, max_len: int) -> ClusterTables:
    """The tables of ``dep``'s clusters for prompts up to ``max_len`` tokens."""
    names = [c.name for c in dep.clusters]
    skv, kv0, steps, bsms, win, observed = [], [], [], [], [], []
    for spec in dep.clusters:
        pp = spec.prefill_profile
        dp = spec.decode_profile
        pf_time = length_table(pp.t_prefill, max_len) if pp else None
        prof_kv = pp or dp
        skv.append(length_table(prof_kv.s_kv, max_len))
        kv0.append(float(prof_kv.s_kv(0.0)))
        roles = [Role.PREFILL] * spec.n_prefill + [Role.DECODE] * spec.n_decode
        bsm = int(dp.bs_max) if dp is not None and dp.has_decode else 0
        if spec.kind == "pd" and bsm:
            steps.append([0.0] + [dp.decode_step_time(b) for b in range(1, bsm + 1)])
        else:
            steps.append(None)
            if spec.kind != "pd":
                bsm = 0
        bsms.append(bsm)
        prefix = PrefixIndex(spec.cache_blocks) if spec.cache_blocks > 0 else None
        observed.append(ObservedCluster(spec.name, spec.kind, roles, pp, bsm, prefix, max_len))
        ck = spec.chunk_tokens
        f = pf_time
        win.append(
            (lambda u, f=f, ck=ck: f(u) - f(u - ck) if u > ck else f(u)) if ck and f else None
        )
    return ClusterTables(
        names=names,
        index={n: i for i, n in enumerate(names)},
        kv_bytes=skv,
        kv0=kv0,
        step=steps,
        bs_max=bsms,
        rdma_Bps=[c.rdma_gbps * 1e9 / 8 for c in dep.clusters],
        last_chunk_s=win,
        export_Bps=[c.export_gbps * 1e9 / 8 for c in dep.clusters],
        import_Bps=[c.import_gbps * 1e9 / 8 for c in dep.clusters],
        import_fixed_s=[c.import_fixed_s for c in dep.clusters],
        kv_layers=[c.kv_layers for c in dep.clusters],
        observed=observed,
    )
