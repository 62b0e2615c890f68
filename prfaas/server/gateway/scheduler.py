"""The gateway's scheduler, built from the deployment config: the hardware profile it plans with, the
topology its nodes form, the observer and the policy (``policies.make_policy`` through
``scheduling.live``).

``router.policy: prfaas`` is the paper's whole scheduler unless the config (or ``--fixed-threshold``)
fixes t: the planner's t over the profile and the expected prompt lengths (``router.prior``, default a
log-normal of median ``max_model_len / 8``), re-searched over the observed post-match lengths and on
egress/queue signals, and (``router.rebalance``) live PD role switches.  The profile is
``router.profile`` or the packaged ``prfaas/configs/profile_<model>_<device>.yaml``; without one the
gateway plans with a generic profile (prefill 5,000 tokens/s, 64 KiB + 1 KiB per token of KV) and
says so in its log.
"""

from __future__ import annotations

import logging
from typing import Any

from prfaas.scheduling.lengths import TruncatedLogNormal
from prfaas.scheduling.live import (
    LiveScheduler,
    Topology,
    build_observer,
    default_prior,
    make_live_fleet_policy,
)
from prfaas.scheduling.policies import Policy
from prfaas.scheduling.profile import HardwareProfile, load_profiles
from prfaas.scheduling.types import Role
from prfaas.server.config import DeployConfig
from prfaas.server.gateway.node_client import NodeEndpoint

log = logging.getLogger("prfaas.server.router")


def generic_profile(max_len: int) -> HardwareProfile:
    """A stand-in when no profile is known: 5,000 prefill tokens/s, 64 KiB + 1 KiB/token of KV,
    decode steps of 20 ms (batch 1) to 40 ms (batch 64)."""
    hi = max(int(max_len), 256)
    return HardwareProfile(
        "generic",
        1,
        (128, hi),
        (65536 + 1024 * 128, 65536 + 1024 * hi),
        (128 / 5000, hi / 5000),
        decode_batch=(1, 64),
        decode_step_s=(0.02, 0.04),
        interp="linear",
    )


def gateway_profile(cfg: DeployConfig, max_len: int) -> HardwareProfile:
    """The profile of the deployment's nodes (one hardware kind): the first one in its file."""
    p = cfg.profile_path()
    if p is None:
        log.warning(
            "no hardware profile for %s on %s: planning with a generic one", cfg.model, cfg.device
        )
        return generic_profile(max_len)
    profs = load_profiles(p)
    return next(iter(profs.values()))


def topology(cfg: DeployConfig, by_cluster: dict[str, list[NodeEndpoint]]) -> Topology:
    clusters = tuple(
        (c.name, c.kind, tuple(Role(e.role) for e in by_cluster[c.name])) for c in cfg.clusters
    )
    links = tuple((lk.src, lk.dst, lk.nominal_gbps, lk.rtt_ms) for lk in cfg.links)
    return Topology(clusters, links)


def build_scheduler(
    cfg: DeployConfig,
    by_cluster: dict[str, list[NodeEndpoint]],
    prefix: dict[str, Any],
    policy: Policy | None = None,
) -> LiveScheduler:
    """Observer + policy of the deployment (``policy`` given: that one)."""
    lim = cfg.engine_limits()
    r = cfg.router
    prof = gateway_profile(cfg, lim.max_model_len)
    topo = topology(cfg, by_cluster)
    obs = build_observer(topo, prof, lim.max_num_seqs, lim.max_model_len, prefix)
    if policy is None:
        prior = (
            TruncatedLogNormal(r.prior["mu"], r.prior["sigma"], r.prior["lo"], r.prior["hi"])
            if r.prior
            else default_prior(lim.max_model_len)
        )
        policy = make_live_fleet_policy(
            topo,
            prof,
            lim.max_num_seqs,
            r.output_len,
            cfg.prfaas_cluster,
            cfg.pd_cluster,
            name=r.policy,
            threshold=r.threshold,
            prior=prior,
            max_len=lim.max_model_len,
            rebalance=r.rebalance and _can_switch(cfg),
            adaptive_opts=r.adaptive_opts,
            rebalance_opts=r.rebalance_opts,
            cache_mode=r.cache_mode,
        )
    return LiveScheduler(obs, policy)


def _can_switch(cfg: DeployConfig) -> bool:
    """Role switches need a PD cluster of >= 3 nodes (one of each role always stays)."""
    return len(cfg.cluster(cfg.pd_cluster).nodes) >= 3
