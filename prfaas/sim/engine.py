"""The discrete-event simulator: one event heap, FIFO prefill instances, decode slots, shared links.

Per request: arrival (routed by the policy), prefill (FIFO per instance, ``T_prefill`` of the uncached
length), KV transfer (intra-cluster at the RDMA rate; cross-cluster as a flow on a processor-shared
link, started at prefill start when ``pipelined`` (layer-wise streaming: KV is in place at
max(prefill end, flow end)) or at prefill end otherwise), decode admission when a slot is free (up to
``bs_max``), then the slot is held for ``output_len × step_time(batch at admission)``.  TTFT is
admission − arrival (the first token leaves with the KV), E2E adds the decode time.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from prfaas.scheduling.link_view import LinkCapacityEstimator
from prfaas.scheduling.prefix_index import PrefixIndex
from prfaas.scheduling.types import (
    INF,
    ClusterState,
    DecodePool,
    LinkState,
    PrefillPool,
    RequestInfo,
    Role,
    RoleSwitch,
    SystemState,
)
from prfaas.sim.deployment import Deployment
from prfaas.sim.link import Link
from prfaas.sim.workloads import Workload

# event kinds (heap entries are (time, kind, x); ties resolve by kind then x: deterministic)
_PF_DONE, _LINK, _KV, _DEC_DONE, _SWITCH, _SCHED, _TICK = range(7)
_TABLE_STEP = 16


def _table(fn, max_len: int):
    """Fast scalar version of a vectorised length function: a 16-token grid + linear interpolation."""
    xs = np.arange(0, max_len + 2 * _TABLE_STEP, _TABLE_STEP, dtype=float)
    xs[0] = 1.0
    ys = np.asarray(fn(xs), dtype=float)
    ys_l = ys.tolist()
    n = len(ys_l)
    step = _TABLE_STEP

    def f(length: int) -> float:
        k = length // step
        if k == 0 or k >= n - 1:
            return float(fn(float(length)))
        y0 = ys_l[k]
        return y0 + (ys_l[k + 1] - y0) * (length - k * step) / step

    return f


@dataclass(frozen=True)
class SimOptions:
    tick_s: float = 1.0  # monitor interval: link readings, time series, policy.on_tick
    pipelined: bool = True
    switch_cost_s: float = 30.0  # role switch: idle time after draining
    recent_window: int = 2000  # post-match lengths kept for adaptation
    until_s: float | None = None  # stop at this simulated time (unfinished requests stay open)
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {self.tick_s}")
        if self.switch_cost_s < 0 or self.recent_window < 1:
            raise ValueError("switch_cost_s must be >= 0 and recent_window >= 1")
        if self.until_s is not None and not self.until_s > 0:
            raise ValueError("until_s must be > 0")


@dataclass
class SimResult:
    """Per-request times (NaN where not reached) and per-tick time series."""

    system: str
    workload: str
    n: int
    arrival: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray
    uncached: np.ndarray
    cached: np.ndarray
    prefill_start: np.ndarray
    prefill_end: np.ndarray
    kv_ready: np.ndarray
    decode_start: np.ndarray
    done: np.ndarray
    tpot: np.ndarray
    prefill_cluster: np.ndarray  # index into clusters
    offloaded: np.ndarray  # bool: prefilled outside the decode cluster
    cross_bytes: np.ndarray  # bytes this request moved across clusters (KV + cache copies)
    clusters: list[str]
    series: dict[str, list[float]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    end_s: float = 0.0
    wall_s: float = 0.0

    @property
    def ttft(self) -> np.ndarray:
        return self.decode_start - self.arrival

    @property
    def e2e(self) -> np.ndarray:
        return self.done - self.arrival


class Simulator:
    """Runs one workload through one deployment under one policy."""

    def __init__(self, deployment: Deployment, policy, options: SimOptions | None = None) -> None:
        self.dep = deployment
        self.policy = policy
        self.opt = options or SimOptions()

    # ------------------------------------------------------------------------------------------
    def _build(self, max_len: int) -> None:
        dep = self.dep
        self.cnames = [c.name for c in dep.clusters]
        self.cidx = {n: i for i, n in enumerate(self.cnames)}
        clusters: dict[str, ClusterState] = {}
        self.pf_time, self.skv, self.step, self.bsm = [], [], [], []
        self.pq, self.prun, self.dq, self.dassigned, self.switching = [], [], [], [], []
        self.rdma_Bps = []
        for spec in dep.clusters:
            n = spec.n_nodes
            pp = spec.prefill_profile
            dp = spec.decode_profile
            can_prefill = pp is not None
            self.pf_time.append(_table(pp.t_prefill, max_len) if pp else None)
            prof_kv = pp or dp
            self.skv.append(_table(prof_kv.s_kv, max_len))
            roles = [Role.PREFILL] * spec.n_prefill + [Role.DECODE] * spec.n_decode
            pre = None
            if can_prefill:
                bu = [0.0 if r is Role.PREFILL else INF for r in roles]
                pre = PrefillPool(bu, [0] * n, [0] * n)
            dec = None
            bsm = int(dp.bs_max) if dp is not None and dp.has_decode else 0
            if spec.kind == "pd" and bsm:
                dec = DecodePool(
                    [0] * n,
                    [0] * n,
                    [bsm if r is Role.DECODE else 0 for r in roles],
                    [0.0 if r is Role.DECODE else INF for r in roles],
                )
                self.step.append([0.0] + [dp.decode_step_time(b) for b in range(1, bsm + 1)])
            else:
                self.step.append(None)
            self.bsm.append(bsm)
            prefix = PrefixIndex(spec.cache_blocks) if spec.cache_blocks > 0 else None
            clusters[spec.name] = ClusterState(spec.name, spec.kind, pre, dec, prefix, roles)
            self.pq.append([deque() for _ in range(n)])
            self.prun.append([False] * n)
            self.dq.append([deque() for _ in range(n)])
            self.dassigned.append([0] * n)
            self.switching.append([None] * n)
            self.rdma_Bps.append(spec.rdma_gbps * 1e9 / 8)
        self.links: list[Link] = []
        self.link_of: dict[tuple[int, int], int] = {}
        links_state: dict[tuple[str, str], LinkState] = {}
        self.monitors: list[LinkCapacityEstimator] = []
        for spec in dep.links:
            lk = Link(spec.src, spec.dst, spec.gbps)
            self.link_of[(self.cidx[spec.src], self.cidx[spec.dst])] = len(self.links)
            self.links.append(lk)
            ls = LinkState(spec.src, spec.dst, spec.gbps, spec.gbps)
            links_state[(spec.src, spec.dst)] = ls
            self.monitors.append(LinkCapacityEstimator(ls))
        self.state = SystemState(0.0, clusters, links_state, deque(maxlen=self.opt.recent_window))
        self.cstates = [clusters[n] for n in self.cnames]

    # ------------------------------------------------------------------------------------------
    def run(self, workload: Workload) -> SimResult:
        import time as _time

        wall0 = _time.perf_counter()
        opt = self.opt
        n = len(workload)
        if n == 0:
            raise ValueError("workload has no requests")
        self._build(int(workload.input_len.max()))
        arr = workload.arrival_s.tolist()
        inp = workload.input_len.tolist()
        out = workload.output_len.tolist()
        hashes = workload.hash_ids
        nan = math.nan
        pf_start, pf_end, kv_t, dec_t, done_t, tpot = ([nan] * n for _ in range(6))
        unc, cac = [0] * n, [0] * n
        pc, pinst, dc_, dinst = [-1] * n, [-1] * n, [-1] * n, [-1] * n
        svc, xbytes, kvb = [0.0] * n, [0.0] * n, [0.0] * n
        pend = [0] * n
        offl = [False] * n
        self.events: list[str] = []

        heap: list[tuple[float, int, int]] = []
        push, pop = heapq.heappush, heapq.heappop
        links, link_of, nl = self.links, self.link_of, max(len(self.links), 1)
        pools = [c.prefill for c in self.cstates]
        dpools = [c.decode for c in self.cstates]
        prefixes = [c.prefix for c in self.cstates]
        pq, prun, dq, dassigned = self.pq, self.prun, self.dq, self.dassigned
        pf_time, skv, steps, rdma = self.pf_time, self.skv, self.step, self.rdma_Bps
        switching = self.switching
        cidx = self.cidx
        state = self.state
        recent = state.recent_uncached
        policy = self.policy
        decide = policy.decide
        pipelined = opt.pipelined
        until = opt.until_s if opt.until_s is not None else INF
        BIG = 1 << 20

        sched: list[tuple[int, float]] = []
        for li, spec in enumerate(self.dep.links):
            for t, g in spec.schedule:
                push(heap, (t, _SCHED, len(sched)))
                sched.append((li, g))

        def link_resched(li: int, now: float) -> None:
            lk = links[li]
            t = lk.next_done()
            if t < INF:
                push(heap, (t, _LINK, lk.gen * nl + li))

        def start_prefill(c: int, i: int, r: int, now: float) -> None:
            pf_start[r] = now
            prun[c][i] = True
            push(heap, (now + svc[r], _PF_DONE, r))
            if pipelined and offl[r]:
                li = link_of[(c, dc_[r])]
                links[li].add(now, kvb[r], r << 2)
                pend[r] = 2
                link_resched(li, now)

        def enqueue_prefill(r: int, now: float) -> None:
            c, i = pc[r], pinst[r]
            if prun[c][i]:
                pq[c][i].append(r)
            else:
                start_prefill(c, i, r, now)

        def admit(r: int, c: int, d: int, now: float) -> None:
            pool = dpools[c]
            su = pool.slots_used[d] + 1
            pool.slots_used[d] = su
            tp = steps[c][su] if su < len(steps[c]) else steps[c][-1]
            tpot[r] = tp
            dec_t[r] = now
            push(heap, (now + out[r] * tp, _DEC_DONE, r))

        def kv_ready(r: int, now: float) -> None:
            kv_t[r] = now
            c, d = dc_[r], dinst[r]
            pool = dpools[c]
            if pool.slots_used[d] < self.bsm[c] and not dq[c][d]:
                admit(r, c, d, now)
            else:
                dq[c][d].append(r)
                pool.waiting[d] += 1

        def maybe_finish_switch(c: int, i: int, now: float) -> None:
            to = switching[c][i]
            if (
                to is Role.DECODE
                and not prun[c][i]
                and not pq[c][i]
                and pools[c].queue_reqs[i] == 0
                or to is Role.PREFILL
                and dassigned[c][i] == 0
            ):
                switching[c][i] = ("wait", to)
                push(heap, (now + opt.switch_cost_s, _SWITCH, c * BIG + i))

        def apply_actions(actions, now: float) -> None:
            for a in actions or ():
                if not isinstance(a, RoleSwitch):
                    raise ValueError(f"on_tick must return RoleSwitch actions, got {a!r}")
                c = cidx.get(a.cluster)
                if (
                    c is None
                    or self.cstates[c].kind != "pd"
                    or pools[c] is None
                    or dpools[c] is None
                ):
                    raise ValueError(f"role switch needs a PD cluster with both roles: {a!r}")
                roles = self.cstates[c].roles
                i = a.instance
                if not 0 <= i < len(roles) or roles[i] is a.to_role or switching[c][i] is not None:
                    raise ValueError(f"invalid role switch {a!r}")
                switching[c][i] = a.to_role
                if a.to_role is Role.DECODE:
                    pools[c].busy_until[i] = INF
                else:
                    dpools[c].load[i] = INF
                self.events.append(
                    f"{now:.1f}s switch {a.cluster}#{i} -> {a.to_role.value}: {a.reason}"
                )
                maybe_finish_switch(c, i, now)

        # time series
        ser: dict[str, list[float]] = {"t": [], "in_system": [], "threshold": []}
        for nm in self.cnames:
            ser[f"{nm}.prefill_queue"] = []
            ser[f"{nm}.decode_waiting"] = []
            ser[f"{nm}.decode_used"] = []
        for lk in links:
            ser[f"{lk.src}->{lk.dst}.gbps"] = []
            ser[f"{lk.src}->{lk.dst}.capacity_est"] = []
        push(heap, (opt.tick_s, _TICK, 0))

        bar = None
        if opt.progress:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="req", desc=getattr(policy, "name", "sim"), mininterval=1.0)
        completed = 0
        last_bar = 0
        i_arr = 0
        now = 0.0
        done_out: list[int] = []
        while True:
            if i_arr < n and (not heap or arr[i_arr] <= heap[0][0]):
                now = arr[i_arr]
                if now > until:
                    i_arr = n
                    continue
                r = i_arr
                i_arr += 1
                state.now = now
                L = inp[r]
                req = RequestInfo(r, L, hashes[r] if hashes is not None else None, out[r], now)
                d = decide(req, state)
                c = cidx.get(d.prefill_cluster)
                dc = cidx.get(d.decode_cluster)
                if c is None or dc is None or pools[c] is None or dpools[dc] is None:
                    raise ValueError(f"policy routed request {r} to unknown clusters/pools: {d}")
                i, di = d.prefill_instance, d.decode_instance
                pool = pools[c]
                if not (0 <= i < len(pool.busy_until)) or pool.busy_until[i] == INF:
                    raise ValueError(f"policy picked a prefill instance that takes no work: {d}")
                dpool = dpools[dc]
                if not (0 <= di < len(dpool.load)) or dpool.load[di] == INF:
                    raise ValueError(f"policy picked a decode instance that takes no work: {d}")
                u = d.uncached_len
                if not 1 <= u <= L:
                    raise ValueError(f"uncached_len {u} outside [1, {L}] for request {r}")
                recent.append(u)
                unc[r] = u
                cac[r] = L - u
                pc[r], pinst[r], dc_[r], dinst[r] = c, i, dc, di
                px = prefixes[c]
                if px is not None and req.hash_ids:
                    px.lookup(req.hash_ids, L)
                t = pf_time[c](u)
                svc[r] = t
                bu = pool.busy_until
                bu[i] = (bu[i] if bu[i] > now else now) + t
                pool.queue_reqs[i] += 1
                pool.queue_tokens[i] += u
                da = dassigned[dc]
                da[di] += 1
                dpool.load[di] = da[di] / dpool.bs_max[di]
                if c != dc:
                    if (c, dc) not in link_of:
                        raise ValueError(
                            f"no link {self.cnames[c]}->{self.cnames[dc]} for request {r}"
                        )
                    offl[r] = True
                    b = skv[c](u)
                    kvb[r] = b
                    xbytes[r] += b
                if d.copy_from is not None and d.copy_tokens > 0:
                    src = cidx.get(d.copy_from)
                    li = link_of.get((src, c)) if src is not None else None
                    if li is None:
                        raise ValueError(
                            f"no link {d.copy_from}->{d.prefill_cluster} for a cache copy"
                        )
                    b = skv[c](d.copy_tokens)
                    xbytes[r] += b
                    links[li].add(now, b, (r << 2) | 1)
                    link_resched(li, now)
                else:
                    enqueue_prefill(r, now)
                continue
            if not heap:
                break
            now, kind, x = pop(heap)
            if now > until:
                now = until
                break
            if kind == _PF_DONE:
                r = x
                c, i = pc[r], pinst[r]
                pf_end[r] = now
                pool = pools[c]
                pool.queue_reqs[i] -= 1
                pool.queue_tokens[i] -= unc[r]
                px = prefixes[c]
                if px is not None and hashes is not None:
                    px.insert(hashes[r], inp[r], i)
                if offl[r]:
                    if pipelined:
                        pend[r] -= 1
                        if pend[r] == 0:
                            kv_ready(r, now)
                    else:
                        li = link_of[(c, dc_[r])]
                        links[li].add(now, kvb[r], r << 2)
                        pend[r] = 1
                        link_resched(li, now)
                else:
                    push(heap, (now + skv[c](unc[r]) / rdma[c], _KV, r))
                q = pq[c][i]
                if q:
                    start_prefill(c, i, q.popleft(), now)
                else:
                    prun[c][i] = False
                    if switching[c][i] is not None:
                        maybe_finish_switch(c, i, now)
            elif kind == _DEC_DONE:
                r = x
                done_t[r] = now
                completed += 1
                c, d = dc_[r], dinst[r]
                dpool = dpools[c]
                dpool.slots_used[d] -= 1
                da = dassigned[c]
                da[d] -= 1
                if dpool.load[d] != INF:
                    dpool.load[d] = da[d] / dpool.bs_max[d]
                q = dq[c][d]
                if q:
                    dpool.waiting[d] -= 1
                    admit(q.popleft(), c, d, now)
                elif switching[c][d] is not None:
                    maybe_finish_switch(c, d, now)
            elif kind == _KV:
                kv_ready(x, now)
            elif kind == _LINK:
                li = x % nl
                lk = links[li]
                if x // nl != lk.gen:
                    continue
                done_out.clear()
                lk.pop_done(now, done_out)
                for tok in done_out:
                    r = tok >> 2
                    if tok & 1:
                        enqueue_prefill(r, now)
                    else:
                        pend[r] -= 1
                        if pend[r] == 0:
                            kv_ready(r, now)
                link_resched(li, now)
            elif kind == _TICK:
                state.now = now
                for lk, mon in zip(links, self.monitors, strict=True):
                    lk.advance(now)
                    s = mon.update(now, lk.delivered_bytes(), lk.busy_s, lk.bytes_in_flight())
                    ser[f"{lk.src}->{lk.dst}.gbps"].append(s.throughput_gbps)
                    ser[f"{lk.src}->{lk.dst}.capacity_est"].append(s.capacity_gbps)
                ser["t"].append(now)
                ser["in_system"].append(i_arr - completed)
                th = getattr(policy, "threshold", None)
                ser["threshold"].append(nan if th is None else float(th))
                for ci, nm in enumerate(self.cnames):
                    p, dp = pools[ci], dpools[ci]
                    ser[f"{nm}.prefill_queue"].append(sum(p.queue_reqs) if p else 0)
                    ser[f"{nm}.decode_waiting"].append(sum(dp.waiting) if dp else 0)
                    ser[f"{nm}.decode_used"].append(sum(dp.slots_used) if dp else 0)
                apply_actions(policy.on_tick(now, state), now)
                if bar is not None and completed - last_bar >= 1000:
                    bar.update(completed - last_bar)
                    last_bar = completed
                if i_arr < n or completed < i_arr:
                    push(heap, (now + opt.tick_s, _TICK, 0))
            elif kind == _SWITCH:
                c, i = divmod(x, BIG)
                _, to = switching[c][i]
                switching[c][i] = None
                cs = self.cstates[c]
                cs.roles[i] = to
                if to is Role.DECODE:
                    dpools[c].bs_max[i] = self.bsm[c]
                    dpools[c].load[i] = dassigned[c][i] / self.bsm[c]
                else:
                    dpools[c].bs_max[i] = 0
                    pools[c].busy_until[i] = now
                self.events.append(f"{now:.1f}s {cs.name}#{i} now {to.value}")
            elif kind == _SCHED:
                li, g = sched[x]
                links[li].set_gbps(now, g)
                self.events.append(
                    f"{now:.1f}s link {links[li].src}->{links[li].dst} at {g:g} Gbps"
                )
                link_resched(li, now)
        if bar is not None:
            bar.update(completed - last_bar)
            bar.close()

        f64 = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
        return SimResult(
            system=getattr(policy, "name", type(policy).__name__),
            workload=workload.name,
            n=n,
            arrival=f64(arr),
            input_len=np.asarray(inp, np.int64),
            output_len=np.asarray(out, np.int64),
            uncached=np.asarray(unc, np.int64),
            cached=np.asarray(cac, np.int64),
            prefill_start=f64(pf_start),
            prefill_end=f64(pf_end),
            kv_ready=f64(kv_t),
            decode_start=f64(dec_t),
            done=f64(done_t),
            tpot=f64(tpot),
            prefill_cluster=np.asarray(pc, np.int64),
            offloaded=np.asarray(offl, bool),
            cross_bytes=f64(xbytes),
            clusters=list(self.cnames),
            series=ser,
            events=self.events,
            end_s=now,
            wall_s=_time.perf_counter() - wall0,
        )
