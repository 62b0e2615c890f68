"""Simulator core: links, prefix index, engine timings on hand-computed scenarios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prfaas.scheduling.lengths import uncached_lengths
from prfaas.scheduling.link_view import LinkCapacityEstimator
from prfaas.scheduling.policies import HomogeneousPD, Policy, PrfaaSPolicy
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.profile import HardwareProfile
from prfaas.scheduling.types import LinkState, Role, RoleSwitch, RouteDecision
from prfaas.sim.deployment import ClusterSpec, Deployment, LinkSpec
from prfaas.sim.engine import Simulator
from prfaas.sim.link import Link
from prfaas.sim.options import SimOptions
from prfaas.sim.workloads import Workload

GB = 1e9


def lin_profile(bs_max: int = 1, t_decode: float = 0.01) -> HardwareProfile:
    """T_prefill = l / 1000 s, S_kv = l * 1e6 bytes, exactly (linear interpolation)."""
    return HardwareProfile(
        "lin",
        8,
        (1000, 2000),
        (1e9, 2e9),
        (1.0, 2.0),
        bs_max=bs_max,
        t_decode_s=t_decode,
        interp="linear",
    )


def wl(times, lens, outs, hashes=None) -> Workload:
    return Workload(
        "t",
        np.asarray(times, float),
        np.asarray(lens, np.int64),
        np.asarray(outs, np.int64),
        hashes,
    )


# ---- link ------------------------------------------------------------------------------------
def drain(link: Link) -> list[tuple[float, int]]:
    out = []
    while link.n_flows:
        t = link.next_done()
        got: list[int] = []
        link.pop_done(t, got)
        out += [(t, g) for g in got]
    return out


def test_link_single_and_shared_flows():
    lk = Link("a", "b", 8.0)  # 1e9 B/s
    lk.add(0.0, 1 * GB, 1)
    assert drain(lk) == [(pytest.approx(1.0), 1)]
    lk = Link("a", "b", 8.0)
    lk.add(0.0, 1 * GB, 1)
    lk.add(0.0, 2 * GB, 2)  # equal shares: 1 GB each by t=2, then 1 GB alone: t=3
    assert [(round(t, 9), tok) for t, tok in drain(lk)] == [(2.0, 1), (3.0, 2)]
    assert lk.delivered_bytes() == pytest.approx(3 * GB)
    assert lk.busy_s == pytest.approx(3.0)


def test_link_capacity_change_midway():
    lk = Link("a", "b", 8.0)
    lk.add(0.0, 1 * GB, 7)
    lk.set_gbps(0.5, 4.0)  # 0.5 GB left at 0.5 GB/s
    assert lk.bytes_in_flight() == pytest.approx(0.5 * GB)
    assert drain(lk) == [(pytest.approx(1.5), 7)]


def test_link_errors():
    with pytest.raises(ValueError, match="bandwidth"):
        Link("a", "b", 0.0)
    lk = Link("a", "b", 1.0)
    with pytest.raises(ValueError, match="size"):
        lk.add(0.0, -1.0, 0)
    with pytest.raises(ValueError, match="gbps"):
        LinkSpec("a", "b", 10.0, ((5.0, 0.0),))


def test_link_monitor_estimates_capacity_when_saturated_and_recovers():
    st = LinkState("a", "b", nominal_gbps=100.0, capacity_gbps=100.0)
    mon = LinkCapacityEstimator(st, busy_min=0.95, recover=0.1)
    mon.update(1.0, delivered_bytes=20e9 / 8, busy_s=1.0, in_flight=1e9)  # saturated at 20 Gbps
    assert st.throughput_gbps == pytest.approx(20.0)
    assert st.capacity_gbps == pytest.approx(20.0)
    assert st.utilisation == pytest.approx(1.0)
    mon.update(2.0, delivered_bytes=20e9 / 8 + 5e9 / 8, busy_s=1.5, in_flight=0.0)  # half busy
    assert st.capacity_gbps == pytest.approx(30.0)  # 20 + 10% of nominal
    with pytest.raises(ValueError):
        LinkCapacityEstimator(st, busy_min=0.0)


# ---- prefix index ----------------------------------------------------------------------------
def test_prefix_index_match_lru_and_owner():
    px = PrefixIndex(capacity_blocks=4, block_tokens=512)
    assert px.insert([1, 2, 3], prompt_len=1200, instance=5) == 0  # 2 whole blocks only
    assert len(px) == 2 and 3 not in px
    assert px.match_blocks([1, 2, 9]) == 2
    assert px.match_tokens([1, 2, 9], 5000) == 1024
    assert px.match_tokens([1, 2], 1024) == 1023  # at least one token left to compute
    assert px.match_tokens([1, 2], 1000) == 512  # the second block is partial in this prompt
    assert px.match_blocks([5, 1]) == 0  # prefixes match from the start only
    assert px.owner([1, 2], 2) == 5
    px.insert([7, 8, 9], 1536, instance=1)  # 5 blocks > 4: evicts LRU block 1
    assert 1 not in px and px.match_blocks([1, 2]) == 0
    assert px.lookup([2, 5], 2048) == 512
    assert px.hits == 1 and px.hit_rate == pytest.approx(512 / 2048)
    with pytest.raises(ValueError):
        PrefixIndex(-1)


def test_prefix_index_equals_planner_prefix_matching_on_trace(tmp_path):
    rng = np.random.default_rng(3)
    recs, next_id, roots = [], 0, []
    for _ in range(300):  # synthetic trace: shared roots + private tails
        n = int(rng.integers(100, 6000))
        nb = math.ceil(n / 512)
        if roots and rng.random() < 0.6:
            root = roots[int(rng.integers(len(roots)))]
            k = min(len(root), nb)
            ids = list(root[: int(rng.integers(1, k + 1))])
        else:
            ids = []
        while len(ids) < nb:
            ids.append(next_id)
            next_id += 1
        roots.append(ids)
        recs.append({"input_length": n, "hash_ids": ids})
    px = PrefixIndex(10**9)
    mine = []
    for r in recs:
        cached = px.lookup(r["hash_ids"], r["input_length"])
        mine.append(max(1, r["input_length"] - cached))
        px.insert(r["hash_ids"], r["input_length"])
    assert mine == uncached_lengths(recs).astype(int).tolist()


# ---- engine ----------------------------------------------------------------------------------
def pd_only(bs_max: int = 1, n_p: int = 1, n_d: int = 1, cache: int = 0) -> Deployment:
    p = lin_profile(bs_max)
    return Deployment((ClusterSpec("pd", "pd", n_p, n_d, p, p, cache),))


def test_engine_homogeneous_exact_times():
    # r0: prefill 0-1, KV 1e9 B at 800 Gbps = 0.01 s, decode 1000 x 0.01 s.
    # r1: queues behind r0 (prefill 1-3), KV 0.02 s, waits for the single decode slot until 11.01.
    res = Simulator(pd_only(), HomogeneousPD()).run(wl([0.0, 0.5], [1000, 2000], [1000, 10]))
    assert res.prefill_start.tolist() == pytest.approx([0.0, 1.0])
    assert res.prefill_end.tolist() == pytest.approx([1.0, 3.0])
    assert res.kv_ready.tolist() == pytest.approx([1.01, 3.02])
    assert res.decode_start.tolist() == pytest.approx([1.01, 11.01])
    assert res.done.tolist() == pytest.approx([11.01, 11.11])
    # the first token needs one decode step (0.01 s) after admission
    assert res.ttft.tolist() == pytest.approx([1.02, 10.52])
    assert res.tpot.tolist() == pytest.approx([0.01, 0.01])
    assert not res.offloaded.any() and res.cross_bytes.sum() == 0


def prfaas_dep(gbps: float = 8.0, n_f: int = 1, schedule=()) -> Deployment:
    p = lin_profile(bs_max=4)
    return Deployment(
        (ClusterSpec("prfaas", "prfaas", n_f, 0, p), ClusterSpec("pd", "pd", 1, 1, p, p)),
        (LinkSpec("prfaas", "pd", gbps, schedule), LinkSpec("pd", "prfaas", gbps)),
    )


@pytest.mark.parametrize("pipelined,kv", [(False, 4.0), (True, 2.0)])
def test_engine_cross_cluster_transfer(pipelined, kv):
    # r0 (2000 > t) prefills in PrfaaS 0-2 s and sends 2 GB at 1 GB/s; r1 (1000) stays local
    res = Simulator(prfaas_dep(), PrfaaSPolicy(1500), SimOptions(pipelined=pipelined)).run(
        wl([0.0, 0.0], [2000, 1000], [10, 10])
    )
    assert res.offloaded.tolist() == [True, False]
    assert res.kv_ready.tolist() == pytest.approx([kv, 1.01])
    assert res.cross_bytes.tolist() == pytest.approx([2 * GB, 0.0])


def test_engine_concurrent_transfers_share_link_and_schedule():
    res = Simulator(prfaas_dep(n_f=2), PrfaaSPolicy(1500), SimOptions(pipelined=False)).run(
        wl([0.0, 0.0], [2000, 2000], [10, 10])
    )
    assert res.kv_ready.tolist() == pytest.approx([6.0, 6.0])  # 4 GB at 1 GB/s from t=2
    # bandwidth halves at t=3: 1 GB left of 2 GB at 0.5 GB/s -> 5.0
    res = Simulator(
        prfaas_dep(schedule=((3.0, 4.0),)), PrfaaSPolicy(1500), SimOptions(pipelined=False)
    ).run(wl([0.0], [2000], [10]))
    assert res.kv_ready[0] == pytest.approx(5.0)
    assert any("4 Gbps" in e for e in res.events)


def test_engine_prefix_cache_reuse_and_hit_rate():
    hashes = [(1, 2, 3, 4), (1, 2, 3, 9)]
    res = Simulator(pd_only(bs_max=4, cache=100), HomogeneousPD()).run(
        wl([0.0, 5.0], [2000, 2000], [1, 1], hashes)
    )
    assert res.uncached.tolist() == [2000, 2000 - 3 * 512]
    assert res.prefill_end[1] - res.prefill_start[1] == pytest.approx((2000 - 1536) / 1000)


class _Switcher(HomogeneousPD):
    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def on_tick(self, now, state):
        if not self.sent and now >= 1.0:
            self.sent = True
            return [RoleSwitch("pd", 0, Role.DECODE, "test")]
        return []


def test_engine_role_switch_after_drain_and_cost():
    p = lin_profile(bs_max=1)
    dep = Deployment((ClusterSpec("pd", "pd", 2, 1, p, p),))
    sim = Simulator(dep, _Switcher(), SimOptions(switch_cost_s=5.0))
    res = sim.run(wl([0.0, 0.0, 0.0], [2000, 1000, 1000], [100, 100, 100]))
    assert sim.cstates[0].roles == [Role.DECODE, Role.PREFILL, Role.DECODE]
    # node 0 drained at 2.0 (its only prefill), became decode at 1.0 -> drained 2.0 + 5 s = 7.0
    assert any(e.startswith("7.0s pd#0 now decode") for e in res.events)
    assert np.isfinite(res.done).all()


class _Bad(Policy):
    def decide(self, req, state):
        return RouteDecision("pd", 7, "pd", 0, req.prompt_len)


def test_engine_rejects_bad_decisions_and_inputs():
    with pytest.raises(ValueError, match="prefill instance"):
        Simulator(pd_only(), _Bad()).run(wl([0.0], [100], [1]))
    with pytest.raises(ValueError, match="no link"):
        p = lin_profile()
        dep = Deployment(
            (ClusterSpec("prfaas", "prfaas", 1, 0, p), ClusterSpec("pd", "pd", 1, 1, p, p))
        )
        Simulator(dep, PrfaaSPolicy(10)).run(wl([0.0], [100], [1]))
    with pytest.raises(ValueError, match="kind"):
        ClusterSpec("x", "other", 1, 0, lin_profile())
    with pytest.raises(ValueError, match="unique"):
        Deployment((ClusterSpec("a", "prfaas", 1, 0, lin_profile()),) * 2)
    with pytest.raises(ValueError):
        SimOptions(tick_s=0)


def test_engine_offload_fraction_matches_threshold_and_all_complete():
    rng = np.random.default_rng(0)
    n = 400
    lens = rng.integers(100, 4000, n)
    w = wl(np.sort(rng.uniform(0, 2000, n)), lens, np.full(n, 20))
    res = Simulator(prfaas_dep(n_f=2), PrfaaSPolicy(1500)).run(w)
    assert res.offloaded.sum() == int((lens > 1500).sum())
    assert np.isfinite(res.done).all()
    assert res.cross_bytes.sum() == pytest.approx(float(lens[lens > 1500].sum()) * 1e6)
    assert (res.decode_start >= res.kv_ready - 1e-9).all() and (
        res.kv_ready >= res.prefill_end - 1e-9
    ).all()


def test_handoff_tail_agrees_with_the_measured_node():
    # benchmarks/results/handoff_tail.json: tiny on CPU over a 0.2 Gbps / 5 ms link
    from prfaas.sim.handoff_check import check

    rows = check()
    assert {r["mode"] for r in rows} == {"layerwise", "after_prefill"}
    for r in rows:
        assert abs(r["simulated_s"] - r["measured_s"]) <= 0.003 + 0.1 * r["measured_s"], r
    lw = {r["tokens"]: r["simulated_s"] for r in rows if r["mode"] == "layerwise"}
    ap = {r["tokens"]: r["simulated_s"] for r in rows if r["mode"] == "after_prefill"}
    assert all(lw[n] < ap[n] for n in lw)  # streaming during the prefill shortens the tail


def test_handoff_chunk_window_and_export_import_costs():
    # 2000 tokens, chunk 1000: the last chunk computes 1-2 s; 2 layers: the last carries 1 GB.
    # Flow of the other 1 GB starts at 1.0 s (1 GB/s: done at 2.0), last layer at 2.0 -> 3.0;
    # + 0.5 s latency -> KV at 3.5; import 0.25 s fixed + 2 GB at 8 GB/s (64 Gbps) = 0.25 s -> 4.0.
    p = lin_profile(bs_max=4)
    dep = Deployment(
        (
            ClusterSpec("prfaas", "prfaas", 1, 0, p, kv_layers=2, chunk_tokens=1000),
            ClusterSpec("pd", "pd", 1, 1, p, p, import_gbps=64.0, import_fixed_s=0.25),
        ),
        (LinkSpec("prfaas", "pd", 8.0, latency_s=0.5),),
    )
    res = Simulator(dep, PrfaaSPolicy(1500)).run(wl([0.0], [2000], [10]))
    assert res.kv_ready[0] == pytest.approx(4.0)
    # with a 16 Gbps export, the last layer is staged for 0.5 s first: 2.5 -> 3.5 on the wire
    dep2 = Deployment(
        (
            ClusterSpec(
                "prfaas", "prfaas", 1, 0, p, kv_layers=2, chunk_tokens=1000, export_gbps=16.0
            ),
            ClusterSpec("pd", "pd", 1, 1, p, p),
        ),
        (LinkSpec("prfaas", "pd", 8.0),),
    )
    res = Simulator(dep2, PrfaaSPolicy(1500)).run(wl([0.0], [2000], [10]))
    assert res.kv_ready[0] == pytest.approx(3.5)
    assert res.ttft[0] == pytest.approx(3.5 + 0.01)  # + the first decode step


def test_engine_queues_export_on_the_prefill_engine_and_imports_on_the_decode_engine():
    """With the profile's hand-off costs: a prefill instance stages r0's KV (2 GB at 16 Gbps = 1 s)
    before it takes r1, and the decode instance imports one request at a time (0.5 s each: 0.25 s
    fixed + 2 GB at 64 Gbps), r1's import after r0's."""
    p = HardwareProfile.from_dict(
        {**lin_profile(bs_max=4).to_dict(), "export_gbps": 16.0, "import_gbps": 64.0}
        | {"import_fixed_s": 0.25}
    )
    assert p.export_time(2e9) == pytest.approx(1.0) and p.import_time(2e9) == pytest.approx(0.5)
    assert HardwareProfile.from_dict(p.to_dict()) == p
    dep = Deployment(
        (
            ClusterSpec("prfaas", "prfaas", 1, 0, p, export_gbps=16.0),
            ClusterSpec("pd", "pd", 1, 1, p, p, import_gbps=64.0, import_fixed_s=0.25),
        ),
        (LinkSpec("prfaas", "pd", 800.0),),
    )
    res = Simulator(dep, PrfaaSPolicy(1500), SimOptions(pipelined=False)).run(
        wl([0.0, 0.0], [2000, 2000], [1000, 10])
    )
    # r0: prefill 0-2, export 2-3, wire 2 GB at 100 GB/s = 0.02 -> 3.02, import -> 3.52
    # r1: prefill 3-5 (after r0's export), export 5-6, wire -> 6.02; r0 is decoding there (1000
    # steps of 0.01 s): the import waits half a step, then takes 0.5 s -> 6.525
    assert res.prefill_start.tolist() == pytest.approx([0.0, 3.0])
    assert res.kv_ready.tolist() == pytest.approx([3.52, 6.52 + 0.005])
    # two KVs that arrive together import one after the other
    res = Simulator(
        Deployment(
            (
                ClusterSpec("prfaas", "prfaas", 2, 0, p),
                ClusterSpec("pd", "pd", 1, 1, p, p, import_gbps=64.0, import_fixed_s=0.25),
            ),
            (LinkSpec("prfaas", "pd", 800.0),),
        ),
        PrfaaSPolicy(1500),
        SimOptions(pipelined=False),
    ).run(wl([0.0, 0.0], [2000, 2000], [10, 10]))
    assert sorted(res.kv_ready.tolist()) == pytest.approx([2.04 + 0.5, 2.04 + 1.0])


def test_link_flow_below_the_clocks_resolution_completes():
    """A remainder served in less than the clock's resolution at ``now`` completes at ``now``
    (it used to be rescheduled at the same time forever)."""
    lk = Link("a", "b", 1.0)
    now = 300.0
    lk.add(now, 1e6, 7)
    lk.advance(now + 1e6 * 8 / 1e9)
    lk.v -= 5e-6  # a few microbytes short, as float rounding leaves it
    t = lk.next_done()
    assert t == pytest.approx(now + 0.008)
    got: list[int] = []
    lk.pop_done(t, got)
    assert got == [7] and lk.n_flows == 0
