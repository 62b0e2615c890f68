"""Routing policies on hand-built router state (what the live router will pass them)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from prfaas.scheduling.lengths import Empirical
from prfaas.scheduling.planner import Fleet, best_threshold
from prfaas.scheduling.policies import (
    HomogeneousPD,
    LongTermRebalancing,
    NaiveHeterogeneous,
    PrfaaSPolicy,
    ShortTermAdaptation,
    make_policy,
)
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.profile import load_profiles
from prfaas.scheduling.types import (
    INF,
    ClusterState,
    DecodePool,
    LinkState,
    PrefillPool,
    RequestInfo,
    Role,
    SystemState,
)
from prfaas.sim.setups import DEFAULT_CONFIG


def state(link_util: float = 0.0, cap: float = 100.0) -> SystemState:
    f = ClusterState(
        "prfaas", "prfaas", PrefillPool([5.0, 2.0], [2, 1], [0, 0]), None, PrefixIndex(100)
    )
    pd = ClusterState(
        "pd",
        "pd",
        PrefillPool([3.0, 1.0, INF, INF], [1, 1, 0, 0], [0] * 4),
        DecodePool([0, 0, 4, 1], [0, 0, 0, 0], [0, 0, 20, 20], [INF, INF, 0.2, 0.05]),
        PrefixIndex(100),
        [Role.PREFILL, Role.PREFILL, Role.DECODE, Role.DECODE],
    )
    link = LinkState("prfaas", "pd", 100.0, cap, throughput_gbps=link_util * cap)
    return SystemState(0.0, {"prfaas": f, "pd": pd}, {("prfaas", "pd"): link}, deque())


def req(n: int, hashes=None) -> RequestInfo:
    return RequestInfo(1, n, hashes, 1024, 0.0)


def test_least_loaded_and_baselines():
    st = state()
    d = HomogeneousPD().decide(req(30000), st)
    assert (d.prefill_cluster, d.prefill_instance, d.decode_instance) == ("pd", 1, 3)
    assert d.uncached_len == 30000 and not d.offloaded
    d = NaiveHeterogeneous().decide(req(100), st)
    assert (d.prefill_cluster, d.prefill_instance, d.decode_cluster) == ("prfaas", 1, "pd")
    assert d.offloaded


def test_threshold_routing():
    st = state()
    pol = PrfaaSPolicy(19400)
    assert pol.decide(req(19400), st).prefill_cluster == "pd"
    d = pol.decide(req(19401), st)
    assert (d.prefill_cluster, d.prefill_instance, d.decode_instance) == ("prfaas", 1, 3)


def test_cache_rules_scarce_abundant_and_copy():
    st = state()
    ids = tuple(range(40))  # 20480 tokens
    st.clusters["prfaas"].prefix.insert(ids[:30], 30 * 512, instance=0)  # PrfaaS holds 15360
    st.clusters["pd"].prefix.insert(ids[:4], 4 * 512)  # PD holds 2048
    r = req(20480, ids)
    # oblivious: 20480 > t=10000 -> PrfaaS, reuses its own 15360
    d = PrfaaSPolicy(10000, cache_mode="oblivious").decide(r, st)
    assert (d.prefill_cluster, d.uncached_len, d.copy_from) == ("prfaas", 20480 - 15360, None)
    # scarce: l_total - l_pd = 18432 > t -> PrfaaS (its own cache)
    d = PrfaaSPolicy(10000, cache_mode="scarce").decide(r, st)
    assert (d.prefill_cluster, d.uncached_len) == ("prfaas", 5120)
    # scarce with t=19000: 18432 <= t -> PD-P, reuses the PD's 2048
    d = PrfaaSPolicy(19000, cache_mode="scarce").decide(r, st)
    assert (d.prefill_cluster, d.uncached_len, d.copy_from) == ("pd", 18432, None)
    # abundant: l_prefix = 15360, 5120 <= 19000 -> PD-P, copy 15360 - 2048 from PrfaaS
    d = PrfaaSPolicy(19000, cache_mode="abundant").decide(r, st)
    assert (d.prefill_cluster, d.uncached_len, d.copy_from, d.copy_tokens) == (
        "pd",
        5120,
        "prfaas",
        13312,
    )
    # auto: link busy -> behaves as scarce; idle -> abundant
    assert (
        PrfaaSPolicy(19000, cache_mode="auto")
        .decide(
            r,
            state(0.9),
        )
        .copy_from
        is None
    )
    st2 = state(0.9)
    st2.clusters["prfaas"].prefix.insert(ids[:30], 30 * 512)
    st2.clusters["pd"].prefix.insert(ids[:4], 4 * 512)
    assert PrfaaSPolicy(19000, cache_mode="auto").decide(r, st2).prefill_cluster == "pd"
    assert PrfaaSPolicy(19000, cache_mode="auto").decide(r, st2).copy_from is None
    assert PrfaaSPolicy(19000, cache_mode="auto").decide(r, st).copy_from == "prfaas"


def test_cache_affinity_prefers_owner_within_slack():
    st = state()
    ids = tuple(range(8))
    st.clusters["prfaas"].prefix.insert(ids, 4096, instance=0)
    r = req(40000, ids)
    assert PrfaaSPolicy(19000, affinity_slack_s=5.0).decide(r, st).prefill_instance == 0
    assert PrfaaSPolicy(19000, affinity_slack_s=1.0).decide(r, st).prefill_instance == 1


def fleet() -> Fleet:
    p = load_profiles(DEFAULT_CONFIG)
    return Fleet(p["h200-8x"], p["h20-8x"], p["h20-8x"], 4, 3, 5, 100.0, 1024)


def test_short_term_adaptation_researches_t_with_planner_on_capacity_drop():
    st = state(link_util=0.3, cap=100.0)
    pd = st.clusters["pd"]  # 2 prefill, 2 decode nodes; PrfaaS has 2 active instances
    samples = np.random.default_rng(0).lognormal(9.9, 1.0, 500).clip(128, 131072).round()
    st.recent_uncached.extend(samples.tolist())
    pol = PrfaaSPolicy(
        19400, adaptive=ShortTermAdaptation(fleet(), cooldown_s=0.0, bandwidth_headroom=1.0)
    )
    from dataclasses import replace

    grid = np.concatenate([[0.0], np.unique(np.quantile(samples, np.linspace(0, 1, 256)))])
    f = replace(fleet(), n_prfaas=2, n_p=2, n_d=2)
    pol.on_tick(1.0, st)  # the first search: over the observed lengths, at the state's split
    assert pol.adaptive.searches == 1 and pol.history[-1][2] == "observed lengths"
    t_seen = best_threshold(Empirical(samples), f, grid).threshold
    assert pol.threshold == t_seen
    pol.on_tick(2.0, st)  # nothing triggers
    assert pol.adaptive.searches == 1
    st.links[("prfaas", "pd")].capacity_gbps = 5.0  # the monitor saw the link drop
    pol.on_tick(3.0, st)
    assert pol.adaptive.searches == 2 and "link capacity" in pol.history[-1][2]
    want = best_threshold(Empirical(samples), replace(f, link_gbps=5.0), grid).threshold
    assert pol.threshold == want and want > t_seen  # less bandwidth: offload fewer, longer requests
    assert pd.roles.count(Role.PREFILL) == 2


def test_long_term_rebalancing_switches_roles():
    st = state()
    dec = st.clusters["pd"].decode
    dec.waiting[2:] = [30, 30]  # decode is the bottleneck, prefill idle
    pol = PrfaaSPolicy(19400, rebalance=LongTermRebalancing(period_s=10.0, confirm=1))
    acts = pol.on_tick(100.0, st)
    assert len(acts) == 1 and acts[0].to_role is Role.DECODE and acts[0].instance == 1
    assert pol.on_tick(105.0, st) == []  # within the period
    st = state()
    st.clusters["pd"].prefill.busy_until[:2] = [300.0, 300.0]  # 200 s of backlog per PD-P node
    st.clusters["pd"].decode.slots_used[2:] = [0, 0]
    acts = PrfaaSPolicy(19400, rebalance=LongTermRebalancing(confirm=1)).on_tick(100.0, st)
    assert len(acts) == 1 and acts[0].to_role is Role.PREFILL and acts[0].instance == 3


def test_rebalancing_hysteresis_confirm_reverse_and_one_at_a_time():
    rb = LongTermRebalancing(period_s=10.0, confirm=2, reverse_after_s=100.0)
    pol = PrfaaSPolicy(19400, rebalance=rb)
    st = state()
    st.clusters["pd"].decode.waiting[2:] = [30, 30]  # decode-bound
    assert pol.on_tick(100.0, st) == []  # seen once
    acts = pol.on_tick(110.0, st)  # seen twice in a row: switch
    assert [a.to_role for a in acts] == [Role.DECODE]
    st.clusters["pd"].switching[:] = [None, Role.DECODE, None, None]
    assert pol.on_tick(120.0, st) == [] and pol.on_tick(130.0, st) == []  # one at a time
    st = state()  # now prefill-bound, right after the switch to decode: not reversed yet
    st.clusters["pd"].prefill.busy_until[:2] = [400.0, 400.0]
    st.clusters["pd"].decode.slots_used[2:] = [0, 0]
    assert pol.on_tick(140.0, st) == [] and pol.on_tick(150.0, st) == []
    assert pol.on_tick(210.0, st)[0].to_role is Role.PREFILL  # 100 s after the last switch


def test_make_policy_builds_the_full_scheduler_by_default():
    from prfaas.scheduling.lengths import TruncatedLogNormal

    dist = TruncatedLogNormal(9.9, 1.0, 128, 131072)
    pol = make_policy("prfaas", fleet=fleet(), prior=dist)
    assert pol.adaptive is not None and pol.rebalance is not None
    grid = np.arange(0, 131072 + 64, 64.0)
    want = best_threshold(dist, fleet(), grid).threshold
    assert make_policy("prfaas", fleet=fleet(), prior=dist, grid=grid).threshold == want
    assert 18000 < want < 21000  # the case study's t (paper: 19.4K)
    fixed = make_policy("prfaas", 5000.0)
    assert fixed.threshold == 5000 and fixed.adaptive is None and fixed.rebalance is None
    no_rb = make_policy("prfaas", fleet=fleet(), prior=dist, rebalance=False)
    assert no_rb.adaptive is not None and no_rb.rebalance is None
    with pytest.raises(ValueError, match="fleet"):
        make_policy("prfaas")
    assert make_policy("naive").name == "naive-heterogeneous"


def test_policy_errors():
    with pytest.raises(ValueError, match="cache_mode"):
        PrfaaSPolicy(1.0, cache_mode="x")
    with pytest.raises(ValueError, match="needs a threshold"):
        PrfaaSPolicy(None)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(ValueError):
        ShortTermAdaptation(fleet(), util_hi=0.0)
    st = state()
    st.clusters["pd"].decode.load[:] = [INF] * 4
    with pytest.raises(ValueError, match="no decode instance"):
        HomogeneousPD().decide(req(10), st)
    assert make_policy("homogeneous").name == "homogeneous-pd"
