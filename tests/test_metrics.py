"""Prometheus metrics: every metric the Grafana dashboard (deploy/grafana/prfaas.json) queries is
served by the gateway's or a node's ``/metrics``; vLLM's names are there; a node's metrics say
what its state says.  In process, torch-free (the running deployment's are checked in
tests/test_server.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prfaas.server.config import load_deploy_config
from prfaas.server.gateway.api import build_gateway_app
from prfaas.server.gateway.node_client import NodeEndpoint
from prfaas.server.gateway.router import Router
from prfaas.server.node.metrics import node_registry
from prfaas.server.protocol import LinkReading, NodeCounters, NodeState

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "prfaas.json"
PROMQL_WORDS = {"sum", "by", "rate", "max", "min", "avg", "histogram_quantile", "clamp_min", "le"}
VLLM_NAMES = [
    "vllm:time_to_first_token_seconds",
    "vllm:time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
]


def gateway_metrics_text() -> str:
    cfg = load_deploy_config(full=False)
    eps = [
        NodeEndpoint(n.name, c.name, n.role, "http://127.0.0.1:1")
        for c in cfg.clusters
        for n in c.nodes
    ]
    return TestClient(build_gateway_app(Router(cfg, eps))).get("/metrics").text


STATE = NodeState(
    name="prfaas-0",
    cluster="prfaas",
    role="prefill",
    pid=1,
    waiting=3,
    running=2,
    cache_usage=0.25,
    cache_hit_tokens=64,
    cache_query_tokens=256,
    prefill_tokens_computed=1000,
    decode_tokens=7,
    links={"pd": LinkReading(gbps=1.5, capacity_gbps=2.0, bytes_in_flight=10.0)},
    stats=NodeCounters(prefills=4, bytes_sent={"pd": 12345}),
)


def node_metrics_text() -> str:
    return generate_latest(node_registry(lambda: STATE, "tiny", lambda: 5)).decode()


def families(text: str) -> set[str]:
    """Metric family names as an exposition declares them (``# TYPE``), samples or not."""
    out = set()
    for ln in text.splitlines():
        if ln.startswith("# TYPE "):
            name, kind = ln.split()[2:4]
            out.add(name)
            if kind == "counter":
                out |= {name.removesuffix("_total"), name.removesuffix("_total") + "_total"}
            if kind == "histogram":
                out |= {name + "_bucket", name + "_sum", name + "_count"}
    return out


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = re.sub(r"\{[^}]*\}", "", t["expr"])  # label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
            expr = re.sub(r"by \([^)]*\)", "", expr)  # grouping labels
            expr = re.sub(r"(?<![\w:])\d[\d.]*(e-?\d+)?", "", expr)  # numbers
            for tok in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if tok not in PROMQL_WORDS and not re.fullmatch(r"e\d+", tok):
                    names.add(tok)
    return names


def test_every_metric_the_dashboard_queries_is_served():
    served = families(gateway_metrics_text()) | families(node_metrics_text())
    wanted = dashboard_metrics()
    assert len(wanted) >= 12
    assert wanted <= served, sorted(wanted - served)


def test_vllm_names_are_served():
    served = families(gateway_metrics_text()) | families(node_metrics_text())
    assert set(VLLM_NAMES) <= served, sorted(set(VLLM_NAMES) - served)


def test_node_metrics_read_the_nodes_state():
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(node_metrics_text())
        for s in f.samples
    }
    base = (
        ("cluster", "prfaas"),
        ("engine", "prfaas-0"),
        ("model_name", "tiny"),
        ("role", "prefill"),
    )

    def v(name: str, *extra: tuple[str, str]) -> float:
        return samples[(name, tuple(sorted(base + extra)))]

    assert v("vllm:num_requests_running") == 2 and v("vllm:num_requests_waiting") == 3
    assert v("vllm:kv_cache_usage_perc") == 0.25
    assert v("vllm:prefix_cache_hits_total") == 64 and v("vllm:prefix_cache_queries_total") == 256
    assert v("vllm:num_preemptions_total") == 5
    assert v("prfaas_node_prefill_tokens_computed_total") == 1000
    assert v("prfaas_node_prefills_total") == 4
    assert v("prfaas_node_kv_bytes_sent_total", ("dst_cluster", "pd")) == 12345
    assert v("prfaas_node_link_gbps", ("dst_cluster", "pd")) == 1.5
    assert v("prfaas_node_link_capacity_gbps", ("dst_cluster", "pd")) == 2.0
