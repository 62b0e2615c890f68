"""The gateway's log lines, as vLLM logs them: one INFO line per finished request (its route and
timings) and, every ``interval_s`` while there is traffic, one throughput line (prompt and
generated tokens/s over the interval, requests in flight).  The HTTP clients' per-call INFO
lines (the nodes' ``/state`` polls) are silenced: ``quiet_http_clients``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("prfaas.requests")


def quiet_http_clients() -> None:
    """httpx / httpcore log every call at INFO: the gateway polls each node's /state."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RequestLog:
    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = 0

    def on_request(self, gen: Any, outcome: str) -> None:
        """One line for a finished response (``gen``: a ``Generation``)."""
        self.requests += 1
        self.prompt_tokens += gen.prompt_tokens
        self.generation_tokens += gen.num_tokens
        if not log.isEnabledFor(logging.INFO):
            return
        r = gen.route
        now = time.monotonic()
        ttft = (gen.first_token_at - gen.arrival) if gen.first_token_at is not None else None
        kv = (
            f", KV {r.transfer_bytes} B in {r.transfer_ms:.1f} ms over {r.link}"
            if r.link
            else (
                f", KV {r.transfer_bytes} B in {r.transfer_ms:.1f} ms" if r.transfer_bytes else ""
            )
        )
        log.info(
            "%s %s: %d prompt tokens (%d cached) -> %d tokens, %s; prefill %s/%s, decode %s%s; "
            "TTFT %s, E2E %.3f s",
            r.request_id,
            outcome,
            gen.prompt_tokens,
            r.cached_tokens,
            gen.num_tokens,
            gen.finish_reason or "unfinished",
            r.prefill_cluster or "-",
            r.prefill_node or "-",
            r.decode_node or "-",
            kv,
            f"{ttft:.3f} s" if ttft is not None else "-",
            now - gen.arrival,
        )

    async def run(self, inflight: Callable[[], int]) -> None:
        """Log throughput every ``interval_s`` while requests come or are in flight."""
        last = (self.prompt_tokens, self.generation_tokens, self.requests)
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            cur = (self.prompt_tokens, self.generation_tokens, self.requests)
            running = inflight()
            if cur != last or running:
                dt = now - t0
                log.info(
                    "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                    "tokens/s, Finished: %d reqs, Running: %d reqs",
                    (cur[0] - last[0]) / dt,
                    (cur[1] - last[1]) / dt,
                    cur[2] - last[2],
                    running,
                )
            last, t0 = cur, now
