"""One observer for the simulator and the live router: the same events give the same SystemState,
and the same policy (from the one factory) takes the same decisions on it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prfaas.scheduling.live import LiveScheduler, Topology, build_observer, make_live_fleet_policy
from prfaas.scheduling.observer import ClusterObserver, ObservedCluster, state_dict
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.profile import HardwareProfile
from prfaas.scheduling.types import INF, RequestInfo, Role, RouteDecision
from prfaas.sim.engine import Simulator
from prfaas.sim.from_deploy import deployment_from_topology
from prfaas.sim.options import SimOptions
from prfaas.sim.workloads import Workload

P, D = Role.PREFILL, Role.DECODE
EVENTS = (
    "routed",
    "prefill_done",
    "kv_delivered",
    "decode_done",
    "link_counters",
    "switch_started",
    "switch_done",
)


def profile() -> HardwareProfile:
    return HardwareProfile(
        "cpu",
        1,
        (128, 1024, 4096),
        (2.0e5, 5.0e5, 1.5e6),
        (0.02, 0.1, 0.6),
        decode_batch=(1, 4, 16),
        decode_step_s=(0.01, 0.012, 0.02),
    )


TOPO = Topology(
    (("prfaas", "prfaas", (P,)), ("pd", "pd", (P, P, D, D))),
    (("prfaas", "pd", 0.05, 4.0), ("pd", "prfaas", 0.05, 4.0)),
)


def make_policy():
    return make_live_fleet_policy(
        TOPO,
        profile(),
        4,
        40.0,
        "prfaas",
        "pd",
        max_len=4096,
        adaptive_opts={"min_samples": 20, "cooldown_s": 2.0, "surge_s": 1.0},
        rebalance_opts={
            "period_s": 5.0,
            "confirm": 1,
            "reverse_after_s": 0.0,
            "prefill_hi_s": 1.0,
            "prefill_lo_s": 0.5,
        },
    )


def workload(n: int = 160) -> Workload:
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 40, n))
    lens = rng.integers(64, 4096, n)
    outs = np.where(np.arange(n) < n // 2, rng.integers(4, 20, n), rng.integers(150, 300, n))
    hashes = [tuple(int(rng.integers(0, 3)) * 1000 + k for k in range(x // 512)) for x in lens]
    return Workload("mixed", t, lens, outs, hashes)


def close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not (math.isinf(a) and a == b):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9), path
    else:
        assert a == b, path


def test_one_event_trace_through_the_simulator_and_the_live_scheduler():
    trace: list[tuple] = []

    def hook(obs: ClusterObserver) -> None:
        for name in EVENTS:
            fn = getattr(obs, name)

            def rec(*args, _fn=fn, _name=name, **kw):
                out = _fn(*args, **kw)
                trace.append((_name, args, state_dict(obs.snapshot(args[0]))))
                return out

            setattr(obs, name, rec)

    pol = make_policy()
    on_tick = pol.on_tick

    def tick(now, state):
        acts = on_tick(now, state)
        trace.append(("tick", (now,), list(acts)))
        return acts

    pol.on_tick = tick
    topo_dep = deployment_from_topology(
        TOPO, profile(), 4, kv_layers=2, chunk_tokens=512, cache_blocks=64
    )
    opt = SimOptions(tick_s=0.5, switch_cost_s=1.0)
    res = Simulator(topo_dep, pol, opt, observer_hook=hook).run(workload())
    assert np.isfinite(res.done).all()
    kinds = {e[0] for e in trace}
    assert {
        "routed",
        "kv_delivered",
        "decode_done",
        "link_counters",
        "tick",
        "switch_done",
    } <= kinds
    assert res.offloaded.any() and not res.offloaded.all()

    # replay through the live router's scheduler, built from the same topology and profile
    prefixes = {"prfaas": PrefixIndex(64), "pd": PrefixIndex(64)}
    live = LiveScheduler(build_observer(TOPO, profile(), 4, 4096, prefixes), make_policy())
    decisions = 0
    for name, args, want in trace:
        now = args[0]
        if name == "routed":
            _, req, d = args
            assert live.decide(req, now) == d
            decisions += 1
            live.routed(req, d, now)
        elif name == "prefill_done":
            live.prefill_done(args[1], now)
        elif name == "kv_delivered":
            live.kv_delivered(args[1], now)
        elif name == "decode_done":
            live.decode_done(args[1], now, *args[2:])
        elif name == "link_counters":
            _, src, dst, delivered, busy, in_flight, *up = args
            live.link_reading(src, dst, delivered + in_flight, in_flight, *up, busy_s=busy, now=now)
        elif name == "tick":
            assert live.tick(now) == want
            continue
        elif name == "switch_started":
            continue  # the tick above started it
        elif name == "switch_done":
            live.switch_done(args[1], args[2], now)
        got = state_dict(live.state(now))
        close(got, want)
    assert decisions == len(res.arrival)
    assert live.policy.threshold == pol.threshold and live.policy.history == pol.history


def test_observer_queues_slots_and_availability():
    prof = profile()
    obs = ClusterObserver(
        [
            ObservedCluster("prfaas", "prfaas", [P], prof),
            ObservedCluster("pd", "pd", [P, D], prof, bs_max=1),
        ]
    )
    st = obs.snapshot(0.0)
    t = obs.routed(0.0, RequestInfo("a", 1024), RouteDecision("pd", 0, "pd", 1, 1024))
    obs.routed(0.0, RequestInfo("b", 1024), RouteDecision("pd", 0, "pd", 1, 1024))
    assert t == pytest.approx(0.1) and st.clusters["pd"].prefill.busy_until[0] == pytest.approx(0.2)
    assert st.clusters["pd"].decode.load == [INF, 2.0]
    obs.prefill_done(0.05, "a")  # earlier than the profile said: the estimate follows
    assert st.clusters["pd"].prefill.busy_until[0] == pytest.approx(0.15)
    obs.kv_delivered(0.06, "a")
    obs.kv_delivered(0.2, "b")  # prefill_done implied; one slot: b waits
    dec = st.clusters["pd"].decode
    assert (dec.slots_used, dec.waiting) == ([0, 1], [0, 1])
    obs.decode_done(1.0, "a")
    assert (dec.slots_used, dec.waiting, dec.load) == ([0, 1], [0, 0], [INF, 1.0])
    obs.set_available(1.0, "pd", 1, False)
    assert dec.load[1] == INF
    obs.set_available(1.0, "pd", 1, True)
    assert dec.load[1] == 1.0
    obs.switch_started(1.0, "pd", 1, P)
    assert not obs.drained("pd", 1) and dec.load[1] == INF
    obs.decode_done(2.0, "b")
    assert obs.drained("pd", 1)
    obs.switch_done(2.5, "pd", 1)
    assert st.clusters["pd"].roles == [P, P]
    assert st.clusters["pd"].prefill.busy_until == [pytest.approx(0.2), 2.5]  # b's end, now
    with pytest.raises(ValueError):
        obs.switch_done(3.0, "pd", 1)


def test_link_counter_fold_keeps_totals_monotone_over_restarts():
    """Sources' cumulative (bytes, busy s) fold into monotone totals: bytes add up, busy time is the
    largest increment (the sources share the link), a source whose counters went down restarted."""
    from prfaas.scheduling.link_view import LinkCounterFold

    f = LinkCounterFold()
    assert f.update({"a": (100.0, 1.0), "b": (50.0, 0.5)}) == (150.0, 1.0)
    assert f.update({"a": (300.0, 1.5), "b": (50.0, 2.5)}) == (350.0, 3.0)
    assert f.update({"a": (40.0, 0.25)}) == (390.0, 3.25)  # a restarted; b gone
    assert f.update({"a": (40.0, 0.25), "b": (60.0, 2.5)}) == (400.0, 3.25)  # b back, no change
    assert f.update({}) == (400.0, 3.25)


def test_live_scheduler_feeds_measured_link_counters_as_they_are():
    """With the senders' own counters (bytes on the wire, busy seconds) the estimator reads them
    unchanged: throughput = bytes / interval, busy fraction = busy / interval, and a link busy the
    whole interval with a queue behind it reads its delivered rate as capacity."""
    prof = HardwareProfile(
        "p",
        1,
        (128, 1024),
        (1e5, 1e6),
        (0.01, 0.1),
        decode_batch=(1, 8),
        decode_step_s=(0.01, 0.02),
    )
    topo = Topology(
        (("f", "prfaas", (Role.PREFILL,)), ("pd", "pd", (Role.PREFILL, Role.DECODE))),
        (("f", "pd", 10.0, 2.0),),
    )
    obs = build_observer(topo, prof, 8, 1024)
    sched = LiveScheduler(obs, make_live_fleet_policy(topo, prof, 8, 16, "f", "pd", threshold=256))
    sched.link_reading("f", "pd", 0, 0, busy_s=0.0, delivered_bytes=0.0, now=10.0)
    ls = sched.link_reading("f", "pd", 0, 0, busy_s=0.5, delivered_bytes=2.5e8, now=12.0)
    assert ls.throughput_gbps == pytest.approx(1.0) and ls.busy_fraction == pytest.approx(0.25)
    assert ls.capacity_gbps == pytest.approx(10.0)  # mostly idle: nominal
    ls = sched.link_reading("f", "pd", 0, 4e6, busy_s=2.5, delivered_bytes=7.5e8, now=14.0)
    assert ls.throughput_gbps == pytest.approx(2.0) and ls.busy_fraction == pytest.approx(1.0)
    assert ls.capacity_gbps == pytest.approx(2.0)  # saturated with a queue: the measured rate
