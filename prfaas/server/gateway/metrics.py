"""The router's Prometheus metrics (one registry per router).

vLLM's names where the meaning is the same (``vllm:`` prefix, label ``model_name``), measured at
the gateway over whole requests: ``vllm:time_to_first_token_seconds``,
``vllm:time_per_output_token_seconds``, ``vllm:e2e_request_latency_seconds``,
``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens`` (histograms),
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:request_success_total{finished_reason}``, ``vllm:num_requests_running`` (admitted, not
finished).  Ours (``prfaas_*``): TTFT by prefill cluster (the route), routing decisions (offload
rate), fallbacks, KV bytes and transfer time per link, node queues and health, link throughput and
capacity, prefix hit rate, the routing threshold.  The nodes serve their own ``/metrics``
(``prfaas.server.node.metrics``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from prfaas.server.gateway.request_log import RequestLog

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# vLLM's buckets
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class RouterMetrics:
    def __init__(self, model_name: str = "") -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        self.log = RequestLog()  # one line per request, periodic throughput

        def hist(
            name: str, help_: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(name, help_, list(labels), buckets=buckets, registry=r)

        def count(name: str, help_: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, help_, list(labels), registry=r)

        def gauge(name: str, help_: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, help_, list(labels), registry=r)

        m = ("model_name",)  # vLLM's, with vLLM's buckets
        self.v_ttft = hist("vllm:time_to_first_token_seconds", "Time to first token", m, _TTFT)
        self.v_tpot = hist(
            "vllm:time_per_output_token_seconds", "Time per output token after the first", m, _TPOT
        )
        self.v_e2e = hist("vllm:e2e_request_latency_seconds", "Request latency", m, _E2E)
        self.v_prompt_hist = hist(
            "vllm:request_prompt_tokens", "Prompt tokens per request", m, _TOKENS
        )
        self.v_gen_hist = hist(
            "vllm:request_generation_tokens", "Generated tokens per request", m, _TOKENS
        )
        self.v_prompt = count("vllm:prompt_tokens", "Prompt tokens", m)
        self.v_gen = count("vllm:generation_tokens", "Generated tokens", m)
        self.v_success = count(
            "vllm:request_success", "Requests finished, by finish reason", (*m, "finished_reason")
        )
        self.v_running = gauge("vllm:num_requests_running", "Requests admitted and not finished", m)
        # ours
        link, node = ("src_cluster", "dst_cluster"), ("cluster", "node")
        self.transfer_seconds = hist(
            "prfaas_kv_transfer_seconds",
            "KV transfer time prefill -> decode (sender open to receiver ack)",
            link,
            _LAT,
        )
        self.ttft = hist("prfaas_ttft_seconds", "Time to first token", ["prefill_cluster"], _LAT)
        self.tpot = hist("prfaas_tpot_seconds", "Time per output token after the first", (), _LAT)
        self.requests = count("prfaas_requests", "Requests by outcome", ["outcome"])
        self.decisions = count(
            "prfaas_route_decisions",
            "Routing decisions by prefill cluster",
            ("prefill_cluster", "offloaded"),
        )
        self.fallbacks = count(
            "prfaas_fallbacks", "Prefills retried on another cluster", ["from_cluster"]
        )
        self.transfer_bytes = count(
            "prfaas_kv_transfer_bytes", "KV bytes sent prefill -> decode", link
        )
        self.inflight = gauge("prfaas_inflight_requests", "Requests admitted and not finished")
        self.queue_depth = gauge(
            "prfaas_node_queue_depth", "Waiting + running requests per node", node
        )
        self.node_up = gauge("prfaas_node_up", "1 when the node answers its health poll", node)
        self.link_gbps = gauge("prfaas_link_gbps", "Measured link throughput", ("src", "dst"))
        self.link_capacity = gauge(
            "prfaas_link_capacity_gbps", "Link capacity estimate", ("src", "dst")
        )
        self.cache_hit_rate = gauge(
            "prfaas_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache",
            node,
        )
        self.threshold = gauge("prfaas_routing_threshold_tokens", "Current routing threshold t")
        self.role_switches = count(
            "prfaas_role_switches_total",
            "PD nodes switched to another role (long-term rebalancing)",
            ("cluster", "role"),
        )

    def observe_request(self, gen: Any, outcome: str = "ok") -> None:
        """A response is over: its latencies and token counts (``gen``: a ``Generation``), and
        its log line."""
        self.log.on_request(gen, outcome)
        now = time.monotonic()
        name = self.model_name
        if gen.first_token_at is not None:
            ttft = gen.first_token_at - gen.arrival
            self.ttft.labels(gen.route.prefill_cluster).observe(ttft)
            self.v_ttft.labels(name).observe(ttft)
            if gen.num_tokens > 1:
                tpot = (now - gen.first_token_at) / (gen.num_tokens - 1)
                self.tpot.observe(tpot)
                self.v_tpot.labels(name).observe(tpot)
        self.v_prompt.labels(name).inc(gen.prompt_tokens)
        self.v_gen.labels(name).inc(gen.num_tokens)
        if gen.finish_reason is not None:  # vLLM counts the requests that finished
            self.v_success.labels(name, gen.finish_reason).inc()
            self.v_e2e.labels(name).observe(now - gen.arrival)
            self.v_prompt_hist.labels(name).observe(gen.prompt_tokens)
            self.v_gen_hist.labels(name).observe(gen.num_tokens)
