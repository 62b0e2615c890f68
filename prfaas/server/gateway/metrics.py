"""The router's Prometheus metrics (one registry per router)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "prfaas_ttft_seconds",
            "Time to first token",
            ["prefill_cluster"],
            buckets=_LAT,
            registry=r,
        )
        self.tpot = Histogram(
            "prfaas_tpot_seconds", "Time per output token after the first", buckets=_LAT, registry=r
        )
        self.requests = Counter("prfaas_requests", "Requests by outcome", ["outcome"], registry=r)
        self.decisions = Counter(
            "prfaas_route_decisions",
            "Routing decisions by prefill cluster",
            ["prefill_cluster", "offloaded"],
            registry=r,
        )
        self.fallbacks = Counter(
            "prfaas_fallbacks", "Prefills retried on another cluster", ["from_cluster"], registry=r
        )
        self.transfer_bytes = Counter(
            "prfaas_kv_transfer_bytes",
            "KV bytes sent prefill -> decode",
            ["src_cluster", "dst_cluster"],
            registry=r,
        )
        self.inflight = Gauge(
            "prfaas_inflight_requests", "Requests admitted and not finished", registry=r
        )
        self.queue_depth = Gauge(
            "prfaas_node_queue_depth",
            "Waiting + running requests per node",
            ["cluster", "node"],
            registry=r,
        )
        self.node_up = Gauge(
            "prfaas_node_up",
            "1 when the node answers its health poll",
            ["cluster", "node"],
            registry=r,
        )
        self.link_gbps = Gauge(
            "prfaas_link_gbps", "Measured link throughput", ["src", "dst"], registry=r
        )
        self.link_capacity = Gauge(
            "prfaas_link_capacity_gbps", "Link capacity estimate", ["src", "dst"], registry=r
        )
        self.cache_hit_rate = Gauge(
            "prfaas_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache",
            ["cluster", "node"],
            registry=r,
        )
        self.threshold = Gauge(
            "prfaas_routing_threshold_tokens", "Current routing threshold t", registry=r
        )
        self.role_switches = Counter(
            "prfaas_role_switches_total",
            "PD nodes switched to another role (long-term rebalancing)",
            ["cluster", "role"],
            registry=r,
        )
