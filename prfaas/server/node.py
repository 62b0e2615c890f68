"""A node server: one engine, one role (prefill or decode), one cluster; a control plane over HTTP
and the KV cache over the transfer layer.

Control plane (JSON over HTTP, used by the router):

* ``POST /internal/prefill`` (prefill role): prefill a prompt, export the cache from ``token_start``
  (the prefix the decode node already holds), send it to the decode node's KV receiver (over the
  emulated link when the decode node is in another cluster), answer with the first token and the
  transfer's bytes and time.
* ``POST /internal/decode`` (decode role): an NDJSON stream. First line ``ready`` (the prefix this
  node holds, its KV address); then ``kv`` once the cache arrived and was imported (or ``kv_error``
  if the import was refused), ``token`` lines with new token ids, the last one ``finished``.
* ``POST /internal/abort/{rid}``, ``GET /state``, ``GET /health``, ``POST /admin/link`` (cut or
  restore this node's link to a cluster: fault injection).
* With ``prefix_pool`` on (docs/prefix_pool.md): ``GET /internal/cache_events?since=N`` (the
  prefixes this node and its pool writes hold, for the global KVCache manager),
  ``POST /internal/prefix_publish`` (write a resident prefix to the cluster's pool) and
  ``POST /internal/prefix_copy`` (copy a prefix from another cluster's pool into this one's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from prfaas.cache.hashing import hash_chain
from prfaas.cache.hybrid import CacheFull
from prfaas.cache.store_tier import StoreBlockLayout, StoreTier
from prfaas.engine import LLMEngine, RequestOutput, SamplingParams
from prfaas.server.config import DeployConfig
from prfaas.server.engine_worker import EngineWorker
from prfaas.server.kv_layout import layout_for_engine
from prfaas.server.kv_manager import NodeCacheEvents, copy_prefix
from prfaas.transfer.backend import Delivery, TransferFailure
from prfaas.transfer.errors import TransferError
from prfaas.transfer.registry import create_receiver, create_sender

log = logging.getLogger("prfaas.server.node")


def params_to_dict(p: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(p)


def params_from_dict(d: Any) -> SamplingParams:
    if not isinstance(d, dict):
        raise ValueError("params must be an object")
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown sampling parameters {bad}")
    return SamplingParams(**d)


def wall_time(mono: float | None) -> float | None:
    """A ``time.monotonic()`` reading (the engine's request metrics) as ``time.time()``: the
    per-request timings cross processes and are compared with the transfer layer's."""
    return None if mono is None else mono + (time.time() - time.monotonic())


def _err(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@dataclass
class Expectation:
    """A request the decode node waits the KV cache of."""

    rid: str
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    imported: bool = False
    finished: bool = False
    sent: int = 0

    def push(self, ev: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def on_output(self, out: RequestOutput) -> None:  # engine thread
        new = out.token_ids[self.sent :]
        ev: dict[str, Any] = {
            "event": "token",
            "token_ids": new,
            "finished": out.finished,
            "finish_reason": out.finish_reason,
        }
        m = out.metrics
        if new and not self.sent and m is not None and m.first_token is not None:
            ev["first_token_at"] = wall_time(m.first_token)  # the engine sampled it (time.time())
        self.sent = len(out.token_ids)
        if out.finished:
            self.finished = True
        self.push(ev)


@dataclass
class NodeStats:
    prefills: int = 0
    prefill_failures: int = 0
    bytes_sent: dict[str, int] = field(default_factory=dict)  # per destination cluster
    imports: int = 0
    import_errors: int = 0


class NodeServer:
    """Everything of one node process (build with ``NodeServer(cfg, name)``, then ``start()``)."""

    def __init__(self, cfg: DeployConfig, node_name: str, engine: LLMEngine | None = None) -> None:
        self.cfg = cfg
        self.cluster, self.node = cfg.node(node_name)
        self.role = self.node.role
        _use_device(cfg.node_engine_config(node_name).resolved_device())
        self.engine = engine or LLMEngine(cfg.node_engine_config(node_name))
        self.worker = EngineWorker(self.engine)
        self.layout = layout_for_engine(self.engine)
        self.stats = NodeStats()
        self.expect: dict[str, Expectation] = {}
        self.pending: list[Delivery] = []  # deliveries waiting for a free decode slot
        self.link_down: set[str] = set()
        self.senders: dict[str, Any] = {}  # destination cluster -> sender
        self.peers: dict[str, set[tuple[str, int]]] = {}
        self.inflight: dict[str, set[Any]] = {}  # destination cluster -> open send streams
        self.receiver = None
        self.kv_port = 0
        self.max_expect = 4 * self.engine.config.max_num_seqs
        self._lock = threading.Lock()
        self.cache_events = NodeCacheEvents()
        self.pools: dict[str, Any] = {}  # cluster -> Mooncake Store client (engine thread only)
        self.tier: StoreTier | None = None
        if cfg.prefix_pool:
            self.tier = StoreTier(self._pool(self.cluster.name), cfg.prefix_pool_retry_s)
            self.engine.cache.attach_tier(self.tier)
        self.app = self._build_app()

    def _pool(self, cluster: str) -> Any:
        """The Mooncake Store client of ``cluster``'s pool (opened once)."""
        st = self.pools.get(cluster)
        if st is None:
            from prfaas.cache.pool_mooncake import MooncakeKVStore, PoolAddress

            c = self.cfg.cluster(cluster)
            if not c.pool_master:
                raise ValueError(f"cluster {cluster!r} has no prefix pool address")
            mb = self.cfg.prefix_pool_segment_mb if cluster == self.cluster.name else 16
            st = MooncakeKVStore(
                PoolAddress(c.pool_master, c.pool_metadata), self.node.host, segment_mb=mb
            )
            self.pools[cluster] = st
        return st

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> NodeServer:
        self.worker.add_loop_hook(self._retry_pending)
        self.worker.start()
        if self.role == "decode":
            self.receiver = create_receiver(
                self.cfg.transfer_backend,
                self.layout,
                self.cfg.secret,
                host=self.node.host,
                port=self.node.kv_port,
                on_delivery=self._on_delivery,
                on_failure=self._on_failure,
                # pinned receive buffers on a GPU node (torch's host allocator caches them)
                pin_memory=self.engine.device.type == "cuda",
            ).start()
            self.kv_port = self.receiver.address[1]
        return self

    def close(self) -> None:
        for s in self.senders.values():
            with contextlib.suppress(Exception):
                s.close()
        if self.receiver is not None:
            self.receiver.close()
        self.worker.stop()
        for st in self.pools.values():
            st.close(wait=False)

    # ---- KV in (decode role) ----------------------------------------------------------------
    def _on_delivery(self, d: Delivery) -> None:  # receiver thread
        self._drain_receiver_queue()
        self.worker.call(lambda eng: self._import(eng, d))

    def _on_failure(self, f: TransferFailure) -> None:
        self._drain_receiver_queue()
        log.warning("KV transfer failed for %s: %s", f.request_id, f.error)

    def _drain_receiver_queue(self) -> None:
        """The receiver also puts every item it hands to our callbacks on its ``deliveries``
        queue, which nobody reads here: take one out per callback so it does not keep every
        request's receive buffer alive."""
        if self.receiver is not None:
            with contextlib.suppress(queue.Empty):
                self.receiver.deliveries.get_nowait()

    def _import(self, eng: LLMEngine, d: Delivery) -> None:  # engine thread
        h = d.export.header
        exp = self.expect.get(h.request_id)
        if exp is None or exp.imported:
            log.warning("KV for %s arrived but nobody waits for it; dropped", h.request_id)
            d.release()
            return
        t_import = time.time()
        try:
            out = eng.import_request(d.export, exp.params, h.request_id)
        except CacheFull:
            self.pending.append(d)
            return
        except ValueError as e:
            self.stats.import_errors += 1
            d.release()
            exp.push({"event": "kv_error", "message": str(e)})
            return
        # the import copied the KV into the cache (synchronously): the receive buffer goes back
        # to the receiver's pool, where the next request reuses it (pinned on GPU nodes)
        d.release()
        self.stats.imports += 1
        exp.imported = True
        t = d.timings
        exp.push(
            {
                "event": "kv",
                "token_start": h.token_start,
                "payload_bytes": t.payload_bytes,
                "wire_bytes": t.wire_bytes,
                "receive_s": t.delivered_at - t.header_at,
                "timings": {  # time.time() on this node
                    "header_at": t.header_at,
                    "first_data_at": t.first_data_at,
                    "last_byte_at": t.last_byte_at,
                    "delivered_at": t.delivered_at,
                    "import_start": t_import,
                    "import_end": time.time(),
                },
            }
        )
        if not out.finished:
            self.worker.subscribe(h.request_id, exp.on_output)
        exp.on_output(out)

    def _retry_pending(self, eng: LLMEngine) -> None:
        if not self.pending or not eng.cache.num_free_slots:
            return
        todo, self.pending = self.pending, []
        for d in todo:
            self._import(eng, d)

    # ---- KV out (prefill role) --------------------------------------------------------------
    def _sender(self, cluster: str) -> Any:
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

    def _send_export(self, sender: Any, peer: tuple[str, int], exp: Any) -> Any:
        return sender.send_export(peer, exp)  # thread-safe: concurrent opens keep id order

    def cut_link(self, cluster: str, up: bool) -> int:
        """Fault injection: cut (abort in-flight sends, refuse new ones) or restore a link."""
        if up:
            self.link_down.discard(cluster)
            return 0
        self.link_down.add(cluster)
        streams = list(self.inflight.get(cluster, ()))
        for st in streams:
            st.abort("link cut")
        return len(streams)

    async def prefill(self, body: dict[str, Any]) -> dict[str, Any]:
        """Prefill, export from ``token_start``, ship to the decode node; ValueError on bad input,
        TransferError / TimeoutError when the KV did not arrive."""
        rid = body.get("request_id")
        prompt = body.get("prompt_token_ids")
        dec = body.get("decode")
        token_start = body.get("token_start", 0)
        if not isinstance(rid, str) or not rid:
            raise ValueError("request_id must be a non-empty string")
        if not isinstance(prompt, list) or not isinstance(dec, dict):
            raise ValueError("prompt_token_ids (list) and decode (object) are required")
        if not isinstance(token_start, int) or token_start < 0:
            raise ValueError("token_start must be an integer >= 0")
        params = params_from_dict(body.get("params", {}))
        # the prefill node samples nothing (it computes all prompt tokens but the last; the decode
        # node computes that one and samples): stop rules do not apply here
        run_params = dataclasses.replace(params, ignore_eos=True, stop_token_ids=[], max_tokens=1)
        dst = str(dec.get("cluster", ""))
        peer = (str(dec.get("kv_host")), int(dec.get("kv_port", 0)))
        timeout = float(body.get("timeout_s", 60.0))
        if dst in self.link_down:
            raise TransferError(f"link {self.cluster.name}->{dst} is down")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        marks: dict[str, float | None] = {}

        def on_out(out: RequestOutput) -> None:  # engine thread, right after the step
            if out.finished:
                # the engine's stamps as of now: release() stamps ``finished`` again later
                marks.update(_engine_marks(out))
                if self.engine.device.type == "cuda":  # the step's kernels may still run
                    import torch

                    torch.cuda.synchronize(self.engine.device)
                    marks["synced"] = time.time()
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(out))

        def add(eng: LLMEngine) -> None:
            self.worker.subscribe(rid, on_out)
            try:
                eng.add_request(prompt, run_params, rid, kv_start=token_start)
            except BaseException:
                self.worker.unsubscribe(rid)
                raise

        t0 = time.time()
        await self.worker.acall(add)
        try:
            out: RequestOutput = await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            await self.worker.acall(lambda eng: eng.abort(rid))
            raise
        if out.finish_reason != "prefilled":
            raise TransferError(f"prefill of {rid} ended with {out.finish_reason!r}")
        t_prefill = time.time()

        def export(eng: LLMEngine):  # noqa: ANN202
            try:
                return eng.export_request(rid, token_start)
            finally:
                eng.release(rid)

        exp = await self.worker.acall(export)
        t_export = time.time()
        if dst in self.link_down:
            raise TransferError(f"link {self.cluster.name}->{dst} is down")
        sender = self._sender(dst)
        stream = await asyncio.to_thread(self._send_export, sender, peer, exp)
        self.peers.setdefault(dst, set()).add(peer)
        self.inflight.setdefault(dst, set()).add(stream)
        try:
            st = await asyncio.to_thread(stream.wait, timeout)
        finally:
            self.inflight[dst].discard(stream)
        self.stats.prefills += 1
        self.stats.bytes_sent[dst] = self.stats.bytes_sent.get(dst, 0) + st.total_bytes
        return {
            "request_id": rid,
            "node": self.node.name,
            "cluster": self.cluster.name,
            "prompt_tokens": len(prompt),
            "cached_tokens": out.num_cached_tokens,
            "token_start": token_start,
            "payload_bytes": exp.nbytes(),
            "wire_bytes": st.total_bytes,
            "prefill_s": t_prefill - t0,
            "transfer_s": (st.acked_at or time.time()) - st.opened_at,
            "link": f"{self.cluster.name}->{dst}" if dst != self.cluster.name else None,
            "timings": _prefill_timings(marks, t0, t_prefill, t_export, st),
        }

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        eng = self.engine
        links = {}
        for dst, peers in self.peers.items():
            snaps = []
            for p in list(peers):
                with contextlib.suppress(Exception):
                    snaps.append(self.senders[dst].snapshot(p))
            lk = self.cfg.link(self.cluster.name, dst)
            links[dst] = {
                "up": dst not in self.link_down,
                "gbps": sum(s.gbps for s in snaps),
                "capacity_gbps": max((s.capacity_gbps for s in snaps), default=0.0)
                or (lk.nominal_gbps if lk else 0.0),
                "bytes_in_flight": sum(s.bytes_in_flight for s in snaps),
                "bytes_sent": self.stats.bytes_sent.get(dst, 0),
            }
        for dst in self.link_down:
            links.setdefault(dst, {"up": False, "gbps": 0.0, "capacity_gbps": 0.0})
        return {
            "name": self.node.name,
            "cluster": self.cluster.name,
            "role": self.role,
            "pid": os.getpid(),
            "kv_addr": [self.node.host, self.kv_port] if self.role == "decode" else None,
            "waiting": len(eng.waiting),
            "running": len(eng.running),
            "pending_tokens": sum(r.num_pending for r in list(eng.waiting) + list(eng.running)),
            "expecting": len(self.expect),
            "max_num_seqs": eng.config.max_num_seqs,
            "cache_usage": eng.cache.usage(),
            "cache_hit_tokens": eng.cache.hits,
            "cache_query_tokens": eng.cache.queries,
            "prefill_tokens_computed": eng.num_prefill_tokens_computed,
            "decode_tokens": eng.num_decode_tokens,
            "links": links,
            "stats": dataclasses.asdict(self.stats),
            "pool": self._pool_stats(),
        }

    def _pool_stats(self) -> dict[str, Any] | None:
        if self.tier is None:
            return None
        d = dataclasses.asdict(self.tier.stats)
        d.pop("put_hashes")
        d["available"] = self.tier.available
        return d

    # ---- prefix pool ------------------------------------------------------------------------
    async def cache_events_since(self, since: int) -> dict[str, Any]:
        def sync(eng: LLMEngine) -> dict[str, Any]:
            self.cache_events.sync(eng)
            return self.cache_events.since(since)

        return await self.worker.acall(sync)

    async def prefix_publish(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write the resident prefix ``prompt[:tokens]`` (blocks + checkpoint) to this cluster's pool."""
        prompt, tokens = _prompt_and_tokens(body)
        if self.tier is None:
            raise ValueError("this node has no prefix pool (prefix_pool is off)")

        def publish(eng: LLMEngine) -> dict[str, Any]:
            m = eng.cache.match(prompt, need_state=True, max_tokens=tokens)
            nb = m.num_tokens // eng.cache.block_size
            hs = hash_chain(prompt[: m.num_tokens], eng.cache.block_size)
            n = self.tier.publish(hs[:nb], m.blocks, m.checkpoint)
            return {"tokens": m.num_tokens, "bytes": n}

        return await self.worker.acall(publish)

    async def prefix_copy(self, body: dict[str, Any]) -> dict[str, Any]:
        """Copy ``prompt[:tokens]`` from cluster ``source``'s pool into this cluster's pool over the
        (emulated) link between them."""
        prompt, tokens = _prompt_and_tokens(body)
        src = str(body.get("source", ""))
        self.cfg.cluster(src)  # ValueError if unknown
        if self.tier is None or src == self.cluster.name:
            raise ValueError("prefix copy needs prefix_pool on and another source cluster")
        t0 = time.time()

        def copy(eng: LLMEngine) -> int:
            lay = StoreBlockLayout.of(eng.cache)
            return copy_prefix(self._pool(src), self._pool(self.cluster.name), lay, prompt, tokens)

        n = await self.worker.acall(copy)
        lk = self.cfg.link(src, self.cluster.name) or self.cfg.link(self.cluster.name, src)
        if n and lk is not None:  # the bytes crossed the inter-cluster link (emulated)
            await asyncio.sleep(n * 8 / (lk.nominal_gbps * 1e9) + lk.rtt_ms / 1000)
        return {"bytes": n, "tokens": tokens if n else 0, "copy_s": time.time() - t0}

    # ---- HTTP -------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title=f"prfaas node {self.node.name}")

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "name": self.node.name, "role": self.role, "pid": os.getpid()}

        @app.get("/state")
        async def state() -> dict[str, Any]:
            return self.state()

        @app.post("/admin/link")
        async def admin_link(request: Request) -> JSONResponse:
            body = await _json(request)
            if not isinstance(body, dict) or not isinstance(body.get("up"), bool):
                return _err(400, "bad_request", 'body must be {"cluster": NAME, "up": true|false}')
            cluster = str(body.get("cluster", ""))
            self.cfg.cluster(cluster) if cluster else None
            aborted = self.cut_link(cluster, body["up"])
            return JSONResponse({"cluster": cluster, "up": body["up"], "aborted": aborted})

        @app.post("/internal/prefill")
        async def prefill(request: Request) -> JSONResponse:
            if self.role != "prefill":
                return _err(400, "wrong_role", f"{self.node.name} is a {self.role} node")
            body = await _json(request)
            if not isinstance(body, dict):
                return _err(400, "bad_request", "body must be a JSON object")
            try:
                return JSONResponse(await self.prefill(body))
            except ValueError as e:
                return _err(400, "bad_request", str(e))
            except (TransferError, OSError, TimeoutError) as e:
                self.stats.prefill_failures += 1
                return _err(503, "transfer_failed", f"{type(e).__name__}: {e}")

        @app.post("/internal/decode")
        async def decode(request: Request):  # noqa: ANN202
            if self.role != "decode":
                return _err(400, "wrong_role", f"{self.node.name} is a {self.role} node")
            body = await _json(request)
            try:
                if not isinstance(body, dict):
                    raise ValueError("body must be a JSON object")
                rid, prompt = body.get("request_id"), body.get("prompt_token_ids")
                if not isinstance(rid, str) or not isinstance(prompt, list) or not prompt:
                    raise ValueError("request_id and a non-empty prompt_token_ids are required")
                params = params_from_dict(body.get("params", {}))
            except ValueError as e:
                return _err(400, "bad_request", str(e))
            if rid in self.expect:
                return _err(400, "bad_request", f"request {rid!r} already expected")
            if len(self.expect) >= self.max_expect:
                return _err(
                    503, "overloaded", f"{self.node.name} holds {len(self.expect)} requests"
                )

            def held(eng: LLMEngine) -> int:
                return eng.cache.match(
                    prompt, need_state=False, max_tokens=len(prompt) - 1
                ).num_tokens

            token_start = await self.worker.acall(held)
            exp = Expectation(rid, params, asyncio.get_running_loop(), asyncio.Queue())
            self.expect[rid] = exp
            return StreamingResponse(
                self._decode_stream(exp, token_start), media_type="application/x-ndjson"
            )

        @app.get("/internal/cache_events")
        async def cache_events(since: int = 0) -> dict[str, Any]:
            return await self.cache_events_since(since)

        @app.post("/internal/prefix_publish")
        async def prefix_publish(request: Request) -> JSONResponse:
            try:
                return JSONResponse(await self.prefix_publish(await _json(request)))
            except ValueError as e:
                return _err(400, "bad_request", str(e))

        @app.post("/internal/prefix_copy")
        async def prefix_copy(request: Request) -> JSONResponse:
            try:
                return JSONResponse(await self.prefix_copy(await _json(request)))
            except ValueError as e:
                return _err(400, "bad_request", str(e))
            except Exception as e:  # noqa: BLE001 - a failed copy means: recompute
                log.warning("prefix copy failed: %s", e)
                return _err(503, "copy_failed", f"{type(e).__name__}: {e}")

        @app.post("/internal/abort/{rid}")
        async def abort(rid: str) -> dict[str, Any]:
            exp = self.expect.get(rid)
            if exp is not None:
                exp.push({"event": "error", "message": "aborted by the router"})
            return {"aborted": exp is not None}

        return app

    async def _decode_stream(self, exp: Expectation, token_start: int):  # noqa: ANN202
        rid = exp.rid
        try:
            yield _line(
                {
                    "event": "ready",
                    "node": self.node.name,
                    "token_start": token_start,
                    "kv_addr": [self.node.host, self.kv_port],
                }
            )
            while True:
                ev = await exp.queue.get()
                yield _line(ev)
                if ev["event"] == "error" or (ev["event"] == "token" and ev["finished"]):
                    break
        finally:
            self.expect.pop(rid, None)
            if not exp.finished:
                self.worker.unsubscribe(rid)
                self.worker.call(lambda eng: eng.abort(rid))


def _engine_marks(out: RequestOutput) -> dict[str, float | None]:
    """The engine's per-request stamps of ``out`` (``RequestMetrics``) as ``time.time()``."""
    m = out.metrics
    if m is None:
        return {}
    return {
        "arrival": wall_time(m.arrival),
        "first_scheduled": wall_time(m.first_scheduled),
        "finished": wall_time(m.finished),
    }


def _prefill_timings(
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


def _use_device(dev: Any) -> None:
    """Make a node's CUDA device the current one of this thread, so that streams, graphs and
    pinned buffers created without an explicit device land on it (a node on ``cuda:1``)."""
    if dev.type == "cuda" and dev.index is not None:
        import torch

        torch.cuda.set_device(dev)


def _prompt_and_tokens(body: Any) -> tuple[list[int], int]:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    prompt, tokens = body.get("prompt_token_ids"), body.get("tokens")
    if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
        raise ValueError("prompt_token_ids must be a list of integers")
    if not isinstance(tokens, int) or not 0 < tokens <= len(prompt):
        raise ValueError("tokens must be an integer in [1, len(prompt_token_ids)]")
    return prompt, tokens


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def run_node(
    cfg: DeployConfig,
    node_name: str,
    ready_file: str | None = None,
    parent_pid: int | None = None,
    log_level: str = "warning",
) -> int:
    """Run one node until SIGINT/SIGTERM; writes its ports to ``ready_file`` once serving."""
    server = NodeServer(cfg, node_name).start()
    sock = bind_socket(server.node.host, server.node.http_port)
    http_port = sock.getsockname()[1]
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    ucfg = uvicorn.Config(server.app, log_level=log_level, lifespan="off", access_log=False)
    userver = uvicorn.Server(ucfg)
    info = {
        "name": node_name,
        "cluster": server.cluster.name,
        "role": server.role,
        "host": server.node.host,
        "http_port": http_port,
        "kv_port": server.kv_port,
        "pid": os.getpid(),
    }

    async def serve() -> None:
        task = asyncio.create_task(userver.serve(sockets=[sock]))
        while not userver.started and not task.done():
            await asyncio.sleep(0.02)
        if ready_file and userver.started:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(json.dumps(info))
            tmp.rename(ready_file)
        else:
            print(json.dumps(info), flush=True)
        await task

    install_sigterm_as_interrupt()
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def install_sigterm_as_interrupt() -> None:
    """SIGTERM ends the process like Ctrl-C (uvicorn re-raises the signal after its shutdown)."""
    signal.signal(signal.SIGTERM, _interrupt)
