"""The prefill role: prefill a prompt and send its cache from ``token_start`` to the decode node's
KV receiver (over the emulated link when the decode node is in another cluster).

Layer-wise by default (``layerwise``): the destination is registered before the request enters the
engine, so during the prompt's last prefill chunk each layer's KV goes on the wire as soon as that
layer is computed (``prfaas.kv.streaming.LayerStreamer``, the engine's layer listener) while the
next layers compute; at the hand-off only the stream's end is left. A request with nothing left to
compute (prefix all cached) is exported and sent whole, as is everything with ``layerwise=False``.

Owns the senders (one per destination cluster, opened on first use), the open send streams and
the cut links (fault injection: a cut aborts the in-flight sends and refuses new ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from typing import Any

from prfaas.engine import LLMEngine, RequestOutput
from prfaas.kv.layout import CacheLayout
from prfaas.kv.streaming import LayerStreamer, StreamedRequest
from prfaas.kv.unit import KVExport, TransferHeader
from prfaas.scheduling.link_view import LinkCounterFold
from prfaas.server.config import ClusterConfig, DeployConfig, NodeConfig
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.node.wire import engine_marks, engine_params
from prfaas.server.protocol import LinkReading, NodeCounters, PrefillRequest, PrefillResult
from prfaas.transfer.errors import TransferError
from prfaas.transfer.registry import create_sender

ABORTED_MEMORY = 4096  # aborted request ids remembered (a prefill may arrive after its abort)


class Aborted(Exception):
    """The request was aborted (by the router) before or during its prefill or transfer."""


@dataclasses.dataclass
class _Prefill:
    """A prefill under way: its engine output future and, once sending, its send stream."""

    done: asyncio.Future
    stream: Any = None
    aborted: bool = False


class _ClusterSenders:
    """What the layer streamer sends through: a peer's streams go through its cluster's sender."""

    def __init__(self, side: PrefillSide) -> None:
        self.side = side
        self.cluster_of: dict[tuple[str, int], str] = {}

    def open(self, peer: tuple[str, int], header: TransferHeader) -> Any:
        return self.side.sender_for(self.cluster_of[peer]).open(peer, header)

    def send_export(self, peer: tuple[str, int], export: KVExport) -> Any:
        return self.side.sender_for(self.cluster_of[peer]).send_export(peer, export)


class PrefillSide:
    """KV out: the prefill route's work and the sender pool (thread-safe where noted)."""

    def __init__(
        self,
        cfg: DeployConfig,
        cluster: ClusterConfig,
        node: NodeConfig,
        worker: EngineWorker,
        layout: CacheLayout,
        counters: NodeCounters,
        layerwise: bool = True,
    ) -> None:
        self.cfg, self.cluster, self.node = cfg, cluster, node
        self.worker, self.layout, self.counters = worker, layout, counters
        self.link_down: set[str] = set()
        self.senders: dict[str, Any] = {}  # destination cluster -> sender
        self.peers: dict[str, set[tuple[str, int]]] = {}
        # per destination: the peers' meters folded into monotone totals (sessions may reopen)
        self._link_totals: dict[str, LinkCounterFold] = {}
        self._totals_lock = threading.Lock()
        self.inflight: dict[str, set[Any]] = {}  # destination cluster -> open send streams
        self.active: dict[str, _Prefill] = {}  # request id -> its prefill under way
        self.aborted: OrderedDict[str, None] = OrderedDict()  # recent aborts (refuse late ones)
        self._lock = threading.Lock()
        self._routes = _ClusterSenders(self)
        self.streamer: LayerStreamer | None = None  # layer-wise sending (prefill engines)
        if layerwise and worker.engine.config.role == "prefill":
            self.streamer = LayerStreamer(worker.engine, self._routes)

    def close(self) -> None:
        for s in self.senders.values():
            with contextlib.suppress(Exception):
                s.close()

    def sender_for(self, cluster: str) -> Any:  # any thread
        """The KV sender towards ``cluster`` (made on first use, shared by this node's sends)."""
        with self._lock:
            s = self.senders.get(cluster)
            if s is None:
                link = None
                if cluster != self.cluster.name:
                    lk = self.cfg.link(self.cluster.name, cluster)
                    link = lk.spec() if lk is not None else None
                s = create_sender(
                    self.cfg.transfer_backend, self.layout, self.cfg.secret, link=link
                )
                self.senders[cluster] = s
            return s

    def cut_link(self, cluster: str, up: bool) -> int:
        """Fault injection: cut (abort in-flight sends, refuse new ones) or restore a link;
        returns the number of sends aborted."""
        if up:
            self.link_down.discard(cluster)
            return 0
        self.link_down.add(cluster)
        streams = list(self.inflight.get(cluster, ()))
        for st in streams:
            st.abort("link cut")
        return len(streams)

    def link_readings(self) -> dict[str, LinkReading]:
        """This node's links as the gateway reads them (measured by the senders' meters):
        ``bytes_total`` / ``busy_s`` are monotone totals over the destination's peers
        (:class:`~prfaas.scheduling.link_view.LinkCounterFold`).  Any thread."""
        links: dict[str, LinkReading] = {}
        for dst, peers in self.peers.items():
            snaps = []
            for p in list(peers):
                with contextlib.suppress(Exception):
                    snaps.append((p, self.senders[dst].snapshot(p)))
            with self._totals_lock:
                fold = self._link_totals.setdefault(dst, LinkCounterFold())
                total, busy = fold.update({p: (s.bytes_total, s.busy_s) for p, s in snaps})
            snaps = [s for _, s in snaps]
            lk = self.cfg.link(self.cluster.name, dst)
            links[dst] = LinkReading(
                up=dst not in self.link_down,
                gbps=float(sum(s.gbps for s in snaps)),
                capacity_gbps=float(max((s.capacity_gbps for s in snaps), default=0.0))
                or (lk.nominal_gbps if lk else 0.0),
                bytes_in_flight=float(sum(s.bytes_in_flight for s in snaps)),
                bytes_sent=self.counters.bytes_sent.get(dst, 0),
                bytes_total=int(total),
                busy_s=busy,
            )
        for dst in self.link_down:
            links.setdefault(dst, LinkReading(up=False))
        return links

    def abort(self, rid: str) -> bool:
        """Abort ``rid`` wherever its prefill is (queued, computing, exported, sending): the engine
        frees its cache, its send stream is aborted, its route answers ``Aborted``; a prefill of
        ``rid`` arriving later is refused.  True if the node was serving it.  Event-loop thread."""
        self.aborted[rid] = None
        while len(self.aborted) > ABORTED_MEMORY:
            self.aborted.popitem(last=False)
        p = self.active.get(rid)
        if p is None:
            return False
        p.aborted = True
        if not p.done.done():
            p.done.set_exception(Aborted(f"request {rid!r} aborted"))
        self.worker.call(lambda eng: eng.abort(rid))  # queued, computing or held for export
        if self.streamer is not None:  # its layers may be on their way already
            self.streamer.cancel(rid, "aborted by the router")
        if p.stream is not None:
            p.stream.abort("aborted by the router")
        return True

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Prefill, export from ``token_start``, ship to the decode node; ValueError on bad input,
        TransferError / TimeoutError when the KV did not arrive, Aborted when aborted meanwhile."""
        rid = req.request_id
        if rid in self.aborted:
            raise Aborted(f"request {rid!r} was aborted")
        if rid in self.active:
            raise ValueError(f"request {rid!r} is already being prefilled")
        p = self.active[rid] = _Prefill(asyncio.get_running_loop().create_future())
        try:
            return await self._prefill(req, p)
        except Exception:
            if p.aborted:
                raise Aborted(f"request {rid!r} aborted") from None
            raise
        finally:
            del self.active[rid]

    async def _prefill(self, req: PrefillRequest, p: _Prefill) -> PrefillResult:
        rid, prompt, token_start = req.request_id, req.prompt_token_ids, req.token_start
        params = engine_params(req.params)
        # the prefill node samples nothing (it computes all prompt tokens but the last; the decode
        # node computes that one and samples): stop rules do not apply here
        run_params = dataclasses.replace(params, ignore_eos=True, stop_token_ids=[], max_tokens=1)
        dst = req.decode.cluster
        peer = (req.decode.kv_host, req.decode.kv_port)
        timeout = req.timeout_s
        if dst in self.link_down:
            raise TransferError(f"link {self.cluster.name}->{dst} is down")
        loop = asyncio.get_running_loop()
        done = p.done
        marks: dict[str, float | None] = {}
        on_cuda = self.worker.engine.device.type == "cuda"
        streamer = self.streamer
        handed: dict[str, Any] = {}

        def on_out(out: RequestOutput) -> None:  # engine thread, right after the step
            if out.finished:
                # the engine's stamps as of now: release() stamps ``finished`` again later
                marks.update(engine_marks(out))
                if on_cuda:  # the step's kernels may still run
                    import torch

                    torch.cuda.synchronize(self.worker.engine.device)
                    marks["synced"] = time.time()
                if streamer is not None and out.finish_reason == "prefilled":
                    try:  # the layers are on their way; sends it whole if none was computed
                        handed["st"] = streamer.handoff(rid)
                    except Exception as e:  # noqa: BLE001 - reported on the route's thread
                        handed["error"] = e
                    handed["at"] = time.time()
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(out))

        def add(eng: LLMEngine) -> None:
            self.worker.subscribe(rid, on_out)
            try:
                eng.add_request(prompt, run_params, rid, kv_start=token_start)
            except BaseException:
                self.worker.unsubscribe(rid)
                raise

        t0 = time.time()
        if streamer is not None:  # before the request can run: its first layers may be last
            self._routes.cluster_of[peer] = dst
            # connect now, not on the engine thread when the first layer is ready
            await asyncio.to_thread(self.sender_for(dst).session, peer)
            streamer.expect(rid, peer)
        try:
            await self.worker.acall(add)
            try:
                out: RequestOutput = await asyncio.wait_for(asyncio.shield(done), timeout)
            except BaseException:  # timed out, aborted, or this route cancelled
                self.worker.unsubscribe(rid)
                self.worker.call(lambda eng: eng.abort(rid))
                raise
            if out.finish_reason != "prefilled":
                raise TransferError(f"prefill of {rid} ended with {out.finish_reason!r}")
            if "error" in handed:
                raise handed["error"]
        except BaseException:
            if streamer is not None:
                streamer.cancel(rid)
            raise
        t_prefill = time.time()
        streamed: StreamedRequest | None = handed.get("st")
        if streamed is not None:
            stream, t_export = streamed.stream, handed["at"]
            payload = stream.wire_header.payload_nbytes
        else:

            def export(eng: LLMEngine):  # noqa: ANN202
                try:
                    return eng.export_request(rid, token_start)
                finally:
                    eng.release(rid)

            exp = await self.worker.acall(export)
            t_export = time.time()
            payload = exp.nbytes()
            if dst in self.link_down:
                raise TransferError(f"link {self.cluster.name}->{dst} is down")
            if p.aborted:
                raise Aborted(f"request {rid!r} aborted")
            # thread-safe: concurrent opens keep id order
            stream = await asyncio.to_thread(self.sender_for(dst).send_export, peer, exp)
        p.stream = stream
        if p.aborted:  # aborted while the stream opened
            stream.abort("aborted by the router")
        self.peers.setdefault(dst, set()).add(peer)
        self.inflight.setdefault(dst, set()).add(stream)
        if dst in self.link_down:  # cut while it was streaming
            stream.abort("link cut")
        try:
            st = await asyncio.to_thread(stream.wait, timeout)
        finally:
            self.inflight[dst].discard(stream)
        self.counters.prefills += 1
        self.counters.bytes_sent[dst] = self.counters.bytes_sent.get(dst, 0) + st.total_bytes
        return PrefillResult(
            request_id=rid,
            node=self.node.name,
            cluster=self.cluster.name,
            prompt_tokens=len(prompt),
            cached_tokens=out.num_cached_tokens,
            token_start=token_start,
            payload_bytes=payload,
            wire_bytes=st.total_bytes,
            prefill_s=t_prefill - t0,
            transfer_s=(st.acked_at or time.time()) - st.opened_at,
            link=f"{self.cluster.name}->{dst}" if dst != self.cluster.name else None,
            timings=prefill_timings(marks, t0, t_prefill, t_export, st),
        )


def prefill_timings(
    marks: dict[str, float | None], received: float, seen: float, exported: float, st: Any
) -> dict[str, float | None]:
    """Where one prefill's time went on this node (``time.time()`` seconds): request received,
    engine admission (``engine_arrival``), first step that computed it (``prefill_start``), prefill
    done (``prefill_end``: the engine's hand-off stamp ``engine_finished``, on a GPU after a device
    sync) and seen by the server (``prefill_seen``), cache exported to host memory
    (``export_done``), then the sender's open / finish / last byte / receiver ack."""
    # on a GPU the end is after a device sync (the engine may stamp it before its kernels ran)
    end = marks.get("synced") or marks.get("finished") or seen
    start = marks.get("first_scheduled")
    return {
        "received": received,
        "engine_arrival": marks.get("arrival"),
        "engine_finished": marks.get("finished"),
        "prefill_start": end if start is None else start,  # None: all of it was cached
        "prefill_end": end,
        "prefill_seen": seen,
        "export_done": exported,
        "send_opened": st.opened_at,
        "send_finished": st.finished_at,
        "last_byte_sent": st.last_byte_sent_at,
        "acked": st.acked_at,
    }
