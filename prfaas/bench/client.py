"""Open-loop streaming load client for OpenAI-compatible endpoints (``/v1/completions`` and
``/v1/chat/completions``): async httpx with a bounded connection pool, one task per arrival, every
request accounted for (success, error kind, cancelled, not sent)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from prfaas.bench import routing as rt
from prfaas.bench.pool import ShardedClient
from prfaas.bench.prompts import DEFAULT_BLOCK_TOKENS, PromptBuilder
from prfaas.bench.workload import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
IGNORE_EOS_MODES = ("off", "ignore_eos", "min_tokens", "both")


class BenchError(RuntimeError):
    """The benchmark cannot run (unreachable server, no model name, bad configuration)."""


@dataclass(frozen=True)
class BenchConfig:
    """How to drive the endpoint."""

    url: str
    model: str | None = None
    endpoint: str = "completions"
    concurrency: int | None = None  # max requests in flight (None: pure open loop)
    max_connections: int = 256
    request_timeout_s: float = 300.0  # whole request, send to last byte
    connect_timeout_s: float = 10.0
    max_duration_s: float | None = None  # whole run; in-flight requests are then cancelled
    ignore_eos: str = "both"  # off | ignore_eos | min_tokens | both
    include_usage: bool = True  # stream_options.include_usage
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    prompt_seed: int = 0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {self.url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"--endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}"
            )
        if self.ignore_eos not in IGNORE_EOS_MODES:
            raise ValueError(f"--ignore-eos must be one of {IGNORE_EOS_MODES}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        if not self.request_timeout_s > 0 or not self.connect_timeout_s > 0:
            raise ValueError("timeouts must be > 0 s")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"--max-duration must be > 0 s, got {self.max_duration_s}")
        if self.block_tokens < 1:
            raise ValueError(f"--block-tokens must be >= 1, got {self.block_tokens}")

    @property
    def base_url(self) -> str:
        u = self.url.rstrip("/")
        return u[: -len("/v1")] if u.endswith("/v1") else u


@dataclass
class RequestResult:
    """What happened to one request; times in seconds (``sent_s`` / ``end_s`` from the run start,
    ``ttft_s`` / ``e2e_s`` / ``chunk_s`` from its send)."""

    index: int
    scheduled_s: float
    input_len: int
    max_tokens: int
    sent_s: float | None = None
    end_s: float | None = None
    ok: bool = False
    error: str | None = None  # http_<status> | timeout | connect_error | ... | cancelled | not_sent
    error_detail: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    usage_output_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    routing: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the server's usage count when given, else the text chunks seen."""
        return (
            self.usage_output_tokens if self.usage_output_tokens is not None else len(self.chunk_s)
        )

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); ``None`` below two tokens or on failure."""
        n = self.output_tokens
        if not self.ok or n < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        c = self.chunk_s
        return [b - a for a, b in zip(c, c[1:], strict=False)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "scheduled_s": self.scheduled_s,
            "sent_s": self.sent_s,
            "end_s": self.end_s,
            "input_len": self.input_len,
            "max_tokens": self.max_tokens,
            "ok": self.ok,
            "error": self.error,
            "error_detail": self.error_detail,
            "status": self.status,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.usage_prompt_tokens,
            "chunk_s": self.chunk_s,
            "routing": self.routing,
        }


@dataclass
class BenchRun:
    """All results of a run (one per request, in request order) and the resolved model name."""

    model: str
    results: list[RequestResult]
    duration_s: float


def request_body(cfg: BenchConfig, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The JSON body of one streaming request."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos in ("ignore_eos", "both"):
        body["ignore_eos"] = True
    if cfg.ignore_eos in ("min_tokens", "both"):
        body["min_tokens"] = max_tokens
    body.update(cfg.extra_body)
    return body


def _headers(cfg: BenchConfig) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if cfg.api_key:
        h["Authorization"] = f"Bearer {cfg.api_key}"
    return h


async def resolve_model(client: httpx.AsyncClient, cfg: BenchConfig) -> str:
    """Check the server answers (any HTTP status) and find the model name: ``cfg.model`` or the
    first id of ``GET /v1/models``. Raises :class:`BenchError` on an unreachable server."""
    try:
        r = await client.get(cfg.base_url + "/v1/models", headers=_headers(cfg))
    except httpx.TimeoutException as e:
        raise BenchError(f"{cfg.base_url}: timed out connecting ({type(e).__name__})") from e
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {cfg.base_url}: {type(e).__name__}: {e}") from e
    if cfg.model:
        return cfg.model
    try:
        data = r.json()["data"]
        return str(data[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(
            f"{cfg.base_url}/v1/models gave no model id (HTTP {r.status_code}); pass --model"
        ) from e


def _is_token_chunk(obj: dict[str, Any]) -> bool:
    """Whether a stream chunk carries output: non-empty text / content, or (completions) a text
    field before the finish (a token whose bytes do not decode to text yet). Chat role-only chunks,
    finish-only chunks and usage chunks do not."""
    for c in obj.get("choices") or ():
        if not isinstance(c, dict):
            continue
        text = c.get("text")
        if isinstance(text, str) and (text or c.get("finish_reason") is None):
            return True
        delta = c.get("delta")
        if isinstance(delta, dict) and any(
            isinstance(delta.get(k), str) and delta[k] for k in ("content", "reasoning_content")
        ):
            return True
    return False


async def _stream_one(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], res: RequestResult
) -> None:
    """Send one request and fill ``res`` from the SSE stream (raises httpx errors)."""
    t_send = time.perf_counter()
    async with client.stream("POST", url, content=body, headers=headers) as resp:
        res.status = resp.status_code
        res.routing.update(rt.from_headers(resp.headers.multi_items()))
        if resp.status_code != 200:
            detail = (await resp.aread())[:300].decode("utf-8", errors="replace")
            res.error, res.error_detail = f"http_{resp.status_code}", detail
            res.e2e_s = time.perf_counter() - t_send
            return
        done = False
        async for line in resp.aiter_lines():
            if done or not line.startswith("data:"):
                continue  # read to the end: a fully read response keeps its connection alive
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
            now = time.perf_counter() - t_send
            try:
                obj = json.loads(payload)
            except ValueError:
                res.error, res.error_detail = "bad_stream", payload[:300]
                res.e2e_s = now
                return
            if not isinstance(obj, dict):
                continue
            if obj.get("error") is not None:
                res.error, res.error_detail = "stream_error", json.dumps(obj["error"])[:300]
                res.e2e_s = now
                return
            if _is_token_chunk(obj):
                if res.ttft_s is None:
                    res.ttft_s = now
                res.chunk_s.append(now)
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if usage.get("completion_tokens") is not None:
                    res.usage_output_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    res.usage_prompt_tokens = int(usage["prompt_tokens"])
            rt.merge_body(res.routing, obj)
    res.e2e_s = time.perf_counter() - t_send
    if res.ttft_s is None:
        res.error, res.error_detail = "empty_response", "stream ended without any text"
        return
    res.e2e_s = res.chunk_s[-1]  # last token, not the trailing usage chunk / [DONE]
    res.ok = True


def _error_kind(e: BaseException) -> str:
    if isinstance(e, httpx.TimeoutException | TimeoutError):
        return "timeout"
    if isinstance(e, httpx.ConnectError):
        return "connect_error"
    if isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "connection_lost"
    if isinstance(e, httpx.HTTPError):
        return "http_error"
    return "client_error"


async def run_async(
    requests: list[BenchRequest],
    cfg: BenchConfig,
    on_done: Callable[[RequestResult], None] | None = None,
    stop: asyncio.Event | None = None,
) -> BenchRun:
    """Replay ``requests`` open-loop (each sent at its ``arrival_s`` after the start; with
    ``cfg.concurrency`` at most that many in flight, the rest queue in arrival order). Setting
    ``stop`` ends the run early like ``cfg.max_duration_s`` does (in flight: cancelled, later
    arrivals: not sent)."""
    if not requests:
        raise ValueError("no requests to send")
    stop = stop if stop is not None else asyncio.Event()
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s, pool=None)
    url = cfg.base_url + ENDPOINTS[cfg.endpoint]
    headers = _headers(cfg)
    pool = ShardedClient(cfg.max_connections, timeout)
    try:
        model = await resolve_model(pool.first, cfg)
        builder = PromptBuilder(cfg.block_tokens, cfg.prompt_seed)
        bodies = [
            json.dumps(
                request_body(cfg, model, builder.prompt(r), r.output_len), separators=(",", ":")
            ).encode()
            for r in requests
        ]
        results = [RequestResult(r.index, r.arrival_s, r.input_len, r.output_len) for r in requests]
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        # full collections walk the whole heap (300+ ms stalls of the event loop seen on a trace
        # replay): move what exists now out of the collector's way for the run
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            res = results[i]
            try:
                if sem is not None:
                    await sem.acquire()
                try:
                    res.sent_s = time.perf_counter() - t0
                    async with asyncio.timeout(cfg.request_timeout_s), pool.lease() as client:
                        await _stream_one(client, url, bodies[i], headers, res)
                finally:
                    if sem is not None:
                        sem.release()
            except asyncio.CancelledError:
                res.error, res.error_detail = "cancelled", "run stopped (--max-duration / Ctrl-C)"
            except Exception as e:  # every failure is counted, never dropped
                res.error, res.error_detail = _error_kind(e), f"{type(e).__name__}: {e}"[:300]
            if res.error is not None:
                res.ok = False
            res.end_s = time.perf_counter() - t0
            if on_done is not None:
                on_done(res)

        deadline = None if cfg.max_duration_s is None else t0 + cfg.max_duration_s
        tasks: list[asyncio.Task[None]] = []
        for i, r in enumerate(requests):
            send_at = t0 + r.arrival_s
            if deadline is not None and send_at >= deadline:
                break
            delay = send_at - time.perf_counter()
            if delay > 0 and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            tasks.append(asyncio.create_task(one(i)))
        if tasks:
            wait_s = None if deadline is None else max(0.0, deadline - time.perf_counter())
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([all_done, stopped], timeout=wait_s, return_when="FIRST_COMPLETED")
            stopped.cancel()
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
            await all_done
        for res in results[len(tasks) :]:
            res.error, res.error_detail = "not_sent", "arrival after --max-duration / Ctrl-C"
            if on_done is not None:
                on_done(res)
        ends = [r.end_s for r in results if r.end_s is not None]
        duration = max(ends) if ends else time.perf_counter() - t0
    finally:
        gc.unfreeze()
        await pool.aclose()
    return BenchRun(model, results, duration)


def run(
    requests: list[BenchRequest],
    cfg: BenchConfig,
    on_done: Callable[[RequestResult], None] | None = None,
) -> BenchRun:
    """Synchronous wrapper of :func:`run_async` (own event loop); in the main thread, Ctrl-C
    stops the run and the requests so far are still reported."""

    async def main() -> BenchRun:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, stop.set)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / Windows
            installed = False
        try:
            return await run_async(requests, cfg, on_done, stop)
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())
