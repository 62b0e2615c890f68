"""The discrete-event simulator: one event heap, FIFO prefill instances, decode slots, shared links.

Per request: arrival (routed by the policy), prefill (FIFO per instance, ``T_prefill`` of the uncached
length), the hand-off (intra-cluster at the RDMA rate; cross-cluster as flows on a processor-shared
link), the decode node's import, decode admission when a slot is free (up to ``bs_max``), then the
slot is held for ``output_len × step_time(batch at admission)``.

Hand-off across clusters, as the node does it (``pipelined``, layer-wise streaming): the KV of all
layers but the last goes on the wire while the last prefill chunk computes (from
``prefill end − T_last_chunk``, the whole prefill when the cluster has no ``chunk_tokens``); the last
layer's KV (``(S_kv(l) − S_kv(0)) / kv_layers`` bytes) leaves after the prefill, once staged at
``export_gbps``; the KV is in place ``latency_s`` after the last byte, then imported
(``import_fixed_s + bytes / import_gbps``).  Without ``pipelined`` the whole export is staged and
sent after the prefill.  Inside a cluster the whole KV is staged, then moved at the RDMA rate.

The engines' own queues, as the nodes run them (only where the profile gives the hand-off costs):
a prefill instance stages the KV out of its cache before it takes its next prefill (its engine
thread does it), and a decode instance imports one request at a time, between its decode steps (a
KV that finds the engine in a step waits half a step, on average; the decode steps of its running
requests are not delayed by the import, a simplification).

The policy reads, and the simulator feeds, a :class:`~prfaas.scheduling.observer.ClusterObserver`
(the same object the live router feeds).  TTFT is arrival → the first token: admission plus one
decode step (``first_step``; otherwise admission), E2E adds the decode time.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from prfaas.scheduling.observer import ClusterObserver, ObservedLink
from prfaas.scheduling.types import INF, RequestInfo, Role
from prfaas.sim.cluster_tables import cluster_tables
from prfaas.sim.deployment import Deployment
from prfaas.sim.link import Link
from prfaas.sim.options import SimOptions
from prfaas.sim.policy_checks import check_role_switch, check_route
from prfaas.sim.result import SimResult, TickSeries
from prfaas.sim.workloads import Workload

# event kinds (heap entries are (time, kind, x); ties resolve by kind then x: deterministic)
_PF_DONE, _LINK, _KV, _DEC_DONE, _SWITCH, _SCHED, _TICK, _STREAM, _LAST, _ARRIVE, _FREE = range(11)


class Simulator:
    """Runs one workload through one deployment under one policy."""

    def __init__(
        self,
        deployment: Deployment,
        policy,
        options: SimOptions | None = None,
        observer_hook=None,
    ) -> None:
        """``observer_hook(observer)``, if given, is called with the run's observer before the first
        event (tests use it to record the events the simulator feeds)."""
        self.dep = deployment
        self.policy = policy
        self.opt = options or SimOptions()
        self.observer_hook = observer_hook
        self._stop = [False]  # stop(): the run ends after the current event (a partial result)

    # ------------------------------------------------------------------------------------------
    def _build(self, max_len: int) -> None:
        """The run's tables (:mod:`prfaas.sim.cluster_tables`), per-instance queues, links and
        observer."""
        dep = self.dep
        self.tables = t = cluster_tables(dep, max_len)
        self.cnames, self.cidx = t.names, t.index
        sizes = [spec.n_nodes for spec in dep.clusters]
        self.pq = [[deque() for _ in range(n)] for n in sizes]  # prefill queues (request ids)
        self.prun = [[False] * n for n in sizes]  # prefill instance busy
        self.dq = [[deque() for _ in range(n)] for n in sizes]  # KV in place, waiting for a slot
        self.dused = [[0] * n for n in sizes]  # decode slots in use
        self.switching = [[None] * n for n in sizes]  # role switch under way: the target role
        self.links: list[Link] = []
        self.link_of: dict[tuple[int, int], int] = {}
        for spec in dep.links:
            lk = Link(spec.src, spec.dst, spec.gbps)
            self.link_of[(self.cidx[spec.src], self.cidx[spec.dst])] = len(self.links)
            self.links.append(lk)
        self.observer = ClusterObserver(
            t.observed,
            [ObservedLink(s.src, s.dst, s.gbps) for s in dep.links],
            self.opt.recent_window,
        )
        self.state = self.observer.state
        self.cstates = self.observer.cstates

    def stop(self) -> None:
        """End the run after the event being handled (any thread or a signal handler): ``run``
        returns what it has, ``partial`` set, requests not done NaN where not reached."""
        self._stop[0] = True

    # ------------------------------------------------------------------------------------------
    def run(self, workload: Workload) -> SimResult:
        import time as _time

        wall0 = _time.perf_counter()
        opt = self.opt
        n = len(workload)
        if n == 0:
            raise ValueError("workload has no requests")
        self._build(int(workload.input_len.max()))
        if self.observer_hook is not None:
            self.observer_hook(self.observer)
        obs = self.observer
        arr = workload.arrival_s.tolist()
        inp = workload.input_len.tolist()
        out = workload.output_len.tolist()
        hashes = workload.hash_ids
        nan = math.nan
        pf_start, pf_end, kv_t, dec_t, done_t, tpot, first = ([nan] * n for _ in range(7))
        unc, cac = [0] * n, [0] * n
        pc, pinst, dc_, dinst = [-1] * n, [-1] * n, [-1] * n, [-1] * n
        svc, xbytes, kvb, kvlast, extra = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
        impc = [0.0] * n  # the decode engine's import of the request's KV (seconds)
        pend = [0] * n
        offl = [False] * n
        self.events: list[str] = obs.stats.events

        heap: list[tuple[float, int, int]] = []
        push, pop = heapq.heappush, heapq.heappop
        links, link_of, nl = self.links, self.link_of, max(len(self.links), 1)
        lat = [s.latency_s for s in self.dep.links]
        pq, prun, dq, dused = self.pq, self.prun, self.dq, self.dused
        t = self.tables
        skv, steps, rdma = t.kv_bytes, t.step, t.rdma_Bps
        kv0, win, exp_Bps, imp_Bps = t.kv0, t.last_chunk_s, t.export_Bps, t.import_Bps
        kv_layers, imp_fixed = t.kv_layers, t.import_fixed_s
        switching, bsm = self.switching, t.bs_max
        # the decode engines: busy with imports until (per cluster, per instance)
        dfree = [[0.0] * len(q) for q in dq]
        cidx = self.cidx
        policy = self.policy
        decide = policy.decide
        snapshot = obs.snapshot
        first_step, pipelined = opt.first_step, opt.pipelined
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

        def add_flow(r: int, nbytes: float, now: float) -> None:
            li = link_of[(pc[r], dc_[r])]
            links[li].add(now, nbytes, r << 2)
            link_resched(li, now)

        def part_done(r: int, now: float) -> None:
            pend[r] -= 1
            if pend[r] == 0:
                x = extra[r]
                if x > 0:
                    push(heap, (now + x, _ARRIVE, r))
                else:
                    arrive(r, now)

        def arrive(r: int, now: float) -> None:
            """The KV is at the decode node: its engine imports it, one import at a time, between
            its decode steps (a step under way ends first: half a step on average)."""
            cost = impc[r]
            if cost <= 0:
                kv_ready(r, now)
                return
            c, d = dc_[r], dinst[r]
            start = dfree[c][d]
            if start <= now:
                u = dused[c][d]
                st = steps[c]
                start = now + (0.5 * (st[u] if u < len(st) else st[-1]) if u else 0.0)
            dfree[c][d] = start + cost
            push(heap, (start + cost, _KV, r))

        def free_prefill(c: int, i: int, now: float) -> None:
            q = pq[c][i]
            if q:
                start_prefill(c, i, q.popleft(), now)
            else:
                prun[c][i] = False
                if switching[c][i] is not None:
                    maybe_finish_switch(c, i, now)

        def start_prefill(c: int, i: int, r: int, now: float) -> None:
            pf_start[r] = now
            prun[c][i] = True
            push(heap, (now + svc[r], _PF_DONE, r))
            if pipelined and offl[r]:
                a = kvb[r] - kvlast[r]
                if a > 0:
                    pend[r] += 1
                    w = win[c]
                    ts = now + svc[r] - w(unc[r]) if w is not None else now
                    if ts > now:
                        push(heap, (ts, _STREAM, r))
                    else:
                        add_flow(r, a, now)

        def enqueue_prefill(r: int, now: float) -> None:
            c, i = pc[r], pinst[r]
            if prun[c][i]:
                pq[c][i].append(r)
            else:
                start_prefill(c, i, r, now)

        def admit(r: int, c: int, d: int, now: float) -> None:
            su = dused[c][d] + 1
            dused[c][d] = su
            st = steps[c]
            tp = st[su] if su < len(st) else st[-1]
            tpot[r] = tp
            dec_t[r] = now
            first[r] = now + tp if first_step else now
            push(heap, (now + out[r] * tp, _DEC_DONE, r))

        def kv_ready(r: int, now: float) -> None:
            kv_t[r] = now
            obs.kv_delivered(now, r)
            c, d = dc_[r], dinst[r]
            if dused[c][d] < bsm[c] and not dq[c][d]:
                admit(r, c, d, now)
            else:
                dq[c][d].append(r)

        def maybe_finish_switch(c: int, i: int, now: float) -> None:
            to = switching[c][i]
            name = self.cnames[c]
            if (
                to is Role.DECODE
                and not prun[c][i]
                and not pq[c][i]
                and obs.drained(name, i)
                or to is Role.PREFILL
                and obs.drained(name, i)
            ):
                switching[c][i] = ("wait", to)
                push(heap, (now + opt.switch_cost_s, _SWITCH, c * BIG + i))

        def apply_actions(actions, now: float) -> None:
            for a in actions or ():
                c = check_role_switch(a, cidx, self.cstates, switching)
                i = a.instance
                switching[c][i] = a.to_role
                obs.switch_started(now, a.cluster, i, a.to_role)
                self.events.append(
                    f"{now:.1f}s switch {a.cluster}#{i} -> {a.to_role.value}: {a.reason}"
                )
                maybe_finish_switch(c, i, now)

        series = TickSeries(self.cnames, [(lk.src, lk.dst) for lk in links])
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
        stop = self._stop
        while not stop[0]:
            if i_arr < n and (not heap or arr[i_arr] <= heap[0][0]):
                now = arr[i_arr]
                if now > until:
                    i_arr = n
                    continue
                r = i_arr
                i_arr += 1
                L = inp[r]
                req = RequestInfo(r, L, hashes[r] if hashes is not None else None, out[r], now)
                d = decide(req, snapshot(now))
                c, dc = check_route(d, r, L, cidx, self.cstates, link_of)
                i, di = d.prefill_instance, d.decode_instance
                u = d.uncached_len
                unc[r] = u
                cac[r] = L - u
                pc[r], pinst[r], dc_[r], dinst[r] = c, i, dc, di
                svc[r] = obs.routed(now, req, d)
                b = skv[c](u)
                impc[r] = imp_fixed[dc] + (b / imp_Bps[dc] if imp_Bps[dc] else 0.0)
                x = 0.0
                if c != dc:
                    offl[r] = True
                    kvb[r] = b
                    xbytes[r] += b
                    if pipelined and kv_layers[c]:
                        kvlast[r] = min(max(b - kv0[c], 0.0) / kv_layers[c], b)
                    x += lat[link_of[(c, dc)]]
                    pend[r] = 1  # the prefill itself
                extra[r] = x
                if d.copy_from is not None and d.copy_tokens > 0:
                    src = cidx.get(d.copy_from)
                    li = link_of.get((src, c)) if src is not None else None
                    if li is None:
                        raise ValueError(
                            f"no link {d.copy_from}->{d.prefill_cluster} for a cache copy"
                        )
                    cb = skv[c](d.copy_tokens)
                    xbytes[r] += cb
                    links[li].add(now, cb, (r << 2) | 1)
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
                obs.prefill_done(now, r)
                e = exp_Bps[c]
                ex = 0.0  # the prefill engine stages the KV out of its cache, then takes the next
                if offl[r]:
                    b = kvlast[r] if pipelined else kvb[r]
                    if b > 0:
                        pend[r] += 1
                        if e:
                            ex = b / e
                            push(heap, (now + ex, _LAST, r))
                        else:
                            add_flow(r, b, now)
                    part_done(r, now)
                else:
                    b = skv[c](unc[r])
                    ex = b / e if e else 0.0
                    push(heap, (now + ex + b / rdma[c], _ARRIVE, r))
                if ex > 0:
                    push(heap, (now + ex, _FREE, c * BIG + i))
                else:
                    free_prefill(c, i, now)
            elif kind == _DEC_DONE:
                r = x
                done_t[r] = now
                completed += 1
                c, d = dc_[r], dinst[r]
                obs.decode_done(now, r, out[r])
                dused[c][d] -= 1
                q = dq[c][d]
                if q:
                    admit(q.popleft(), c, d, now)
                elif switching[c][d] is not None:
                    maybe_finish_switch(c, d, now)
            elif kind == _KV:
                kv_ready(x, now)
            elif kind == _ARRIVE:
                arrive(x, now)
            elif kind == _FREE:
                free_prefill(*divmod(x, BIG), now)
            elif kind == _STREAM:
                add_flow(x, kvb[x] - kvlast[x], now)
            elif kind == _LAST:
                add_flow(x, kvlast[x] if pipelined else kvb[x], now)
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
                        part_done(r, now)
                link_resched(li, now)
            elif kind == _TICK:
                for lk in links:
                    lk.advance(now)
                    s = obs.link_counters(
                        now, lk.src, lk.dst, lk.delivered_bytes(), lk.busy_s, lk.bytes_in_flight()
                    )
                    series.link(lk.src, lk.dst, s.throughput_gbps, s.capacity_gbps)
                th = getattr(policy, "threshold", None)
                series.tick(now, i_arr - completed, th, self.cstates)
                apply_actions(policy.on_tick(now, snapshot(now)), now)
                if bar is not None and completed - last_bar >= 1000:
                    bar.update(completed - last_bar)
                    last_bar = completed
                if i_arr < n or completed < i_arr:
                    push(heap, (now + opt.tick_s, _TICK, 0))
            elif kind == _SWITCH:
                c, i = divmod(x, BIG)
                _, to = switching[c][i]
                switching[c][i] = None
                obs.switch_done(now, self.cnames[c], i)
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
            series=series.data,
            events=self.events,
            end_s=now,
            wall_s=_time.perf_counter() - wall0,
            first_token=f64(first),
            partial=stop[0],
        )
