"""``benchmarks/two_gpu.py`` end to end on the CPU (tiny model, every node on the CPU): a deployment
started as ``prfaas up`` starts one, streamed requests at Poisson arrivals, the nodes' TTFT
breakdown, the simulator's prediction for every request, the JSON and markdown reports.  Also the
per-node ``device`` of the deployment file that puts the nodes on different GPUs."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import two_gpu
from prfaas.server.config import parse_deploy_config

THRESHOLD = 320
OUTPUT_LEN = 4
ARGS = [
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--lengths",
    "512",
    "768",
    "1024",
    "--short-lengths",
    "128",
    "--threshold",
    str(THRESHOLD),
    "--num-requests",
    "8",
    "--rate",
    "4",
    "--output-len",
    str(OUTPUT_LEN),
    "--link-gbps",
    "0.5",
    "--link-ms",
    "2",
    "--max-num-seqs",
    "4",
    "--profile-steps",
    "3",
    "--tag",
    "test",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_gpu")
    doc = two_gpu.main([*ARGS, "--out-dir", str(d), "--log-dir", str(d / "run")])
    return doc, d


def test_every_request_completed(run):
    doc, _ = run
    reqs = doc["requests"]
    assert len(reqs) == 8
    assert doc["checks"]["all_completed"]
    for r in reqs:
        assert r["completion_tokens"] == OUTPUT_LEN and r["finish_reason"] == "length"
        # routed by the threshold: long prompts to the PrfaaS node, short ones stay in PD
        assert r["offloaded"] == (r["prompt_tokens"] > THRESHOLD)
        assert r["prefill_node"] == ("prfaas-0" if r["offloaded"] else "pd-p0")
    assert doc["checks"]["offloaded"] >= 1 and doc["checks"]["pd"] >= 1


def test_breakdown_is_non_negative_and_sums_to_the_server_ttft(run):
    doc, _ = run
    for r in doc["requests"]:
        m = r["measured"]
        parts = [m[c] for c in two_gpu.COMPONENTS]
        assert all(p >= -1e-3 for p in parts), (r["index"], m)
        assert all(v >= -1e-3 for v in m["detail"].values()), (r["index"], m["detail"])
        assert math.isclose(sum(parts), m["ttft"], abs_tol=1e-6)
        assert m["prefill"] > 0 and m["first_decode"] > 0
        # the router's own TTFT (its clock: arrival -> first token event read) is the nodes'
        # TTFT plus the hop from the decode node to the router
        gap = m["router_ttft"] - m["ttft"]
        assert -1e-3 <= gap <= 0.1 + 0.25 * m["router_ttft"], (r["index"], m)
        # the client sent before the router saw it and read the first chunk after it
        assert m["client_ttft"] >= m["router_ttft"] - 1e-3
        t = r["timings"]
        assert t["p.prefill_start"] <= t["p.prefill_end"] <= t["p.prefill_seen"] + 1e-3
        assert t["p.send_opened"] <= t["d.header_at"] + 1e-3
        assert t["d.last_byte_at"] <= t["d.delivered_at"] <= t["d.import_start"] + 1e-3


def test_offloaded_kv_crossed_the_shaped_link(run):
    doc, _ = run
    prof = doc["profile"]
    for r in doc["requests"]:
        assert r["transfer_bytes"] > 0 and r["transfer_wire_bytes"] >= r["transfer_bytes"]
        if r["offloaded"]:
            # at 0.5 Gbps the wire part cannot be faster than the bytes / bandwidth
            floor = r["transfer_bytes"] * 8 / 0.5e9
            # (the tail after the prefill can be shorter: layers stream during the last chunk)
            assert r["measured"]["detail"]["wire"] >= 0.9 * floor
    # the KV the profile predicts is the KV that crossed (within a token's share: L vs L - 1)
    off = [r for r in doc["requests"] if r["offloaded"]]
    for r in off:
        assert math.isclose(r["predicted"]["kv_bytes"], r["transfer_bytes"], rel_tol=0.05)
    assert prof["lengths"] == sorted({r["prompt_tokens"] for r in doc["requests"]})


def test_json_has_the_prediction_for_every_request(run):
    doc, d = run
    on_disk = json.loads((d / "two_gpu_test.json").read_text())
    assert on_disk["checks"] == doc["checks"]
    assert len(on_disk["requests"]) == 8
    for r in on_disk["requests"]:
        p = r["predicted"]
        for c in (*two_gpu.COMPONENTS, "ttft"):
            assert math.isfinite(p[c]) and p[c] >= 0, (r["index"], p)
        assert math.isclose(sum(p[c] for c in two_gpu.COMPONENTS), p["ttft"], abs_tol=1e-9)
        assert p["offloaded"] == r["offloaded"]
        assert p["prefill"] > 0 and p["first_decode"] > 0
        assert (p["transfer"] > 0) == r["offloaded"] or p["transfer"] >= 0
    assert on_disk["checks"]["routing_matches_sim"]
    s = on_disk["summary"]
    for cls in two_gpu.CLASSES:
        for c in (*two_gpu.COMPONENTS, "ttft"):
            assert s[cls][c]["measured_mean"] is not None
            assert s[cls][c]["predicted_mean"] is not None
    assert on_disk["setup"]["link_gbps"] == 0.5 and on_disk["setup"]["link_rtt_ms"] == 2
    assert on_disk["machine"]["prefill_device"].startswith("cpu")
    md = (d / "two_gpu_test.md").read_text()
    assert "| component | measured mean | predicted mean |" in md
    assert "benchmarks/two_gpu.py" in md


# ------------------------------------------------------------- per-node device in the config
def _cfg(**node_kw):
    return {
        "model": "tiny",
        "device": "cpu",
        "secret": "test-secret-0123456789abcdef",
        "clusters": [
            {
                "name": "prfaas",
                "kind": "prfaas",
                "nodes": [{"name": "f0", "role": "prefill", **node_kw}],
            },
            {
                "name": "pd",
                "kind": "pd",
                "nodes": [{"name": "p0", "role": "prefill"}, {"name": "d0", "role": "decode"}],
            },
        ],
        "links": [{"src": "prfaas", "dst": "pd", "gbps": 1.0}],
    }


def test_node_device_overrides_the_deployment_device():
    cfg = parse_deploy_config(_cfg(device="cuda:1"))
    assert cfg.node_engine_config("f0").device == "cuda:1"
    assert cfg.node_engine_config("f0").role == "prefill"
    assert cfg.node_engine_config("d0").device == "cpu"
    assert cfg.node_engine_config("d0").role == "decode"
    assert cfg.engine_config("decode").device == "cpu"
    # the written deployment file keeps it (what `prfaas up` hands its node processes)
    assert cfg.to_dict()["clusters"][0]["nodes"][0]["device"] == "cuda:1"
    assert parse_deploy_config(cfg.to_dict()).node_engine_config("f0").device == "cuda:1"
    with pytest.raises(ValueError, match="bad device"):
        parse_deploy_config(_cfg(device="gpu7"))


def test_workload_and_arguments():
    args = two_gpu.parse_args(["--num-requests", "24"])
    assert args.prefill_device == "cuda:0" and args.pd_device == "cuda:1"
    assert args.threshold == (2048 + 8192) // 2 and args.warmup == "full"
    reqs = two_gpu.make_workload(args, 0)
    assert len(reqs) == 24 and reqs[0]["offset_s"] == 0
    assert all(a["offset_s"] <= b["offset_s"] for a, b in zip(reqs, reqs[1:], strict=False))
    short = [r for r in reqs if r["prompt_tokens"] <= args.threshold]
    assert 1 <= len(short) < 24
    assert {r["prompt_tokens"] for r in reqs} <= {1024, 2048, 8192, 16384, 32768}
    cfg = parse_deploy_config(two_gpu.deploy_config(args))
    assert cfg.node_engine_config("prfaas-0").device == "cuda:0"
    assert cfg.node_engine_config("pd-p0").device == "cuda:1"
    assert cfg.node_engine_config("pd-d0").device == "cuda:1"
    assert cfg.link("prfaas", "pd").gbps == 10.0 and cfg.link("prfaas", "pd").rtt_ms == 2.0
    assert cfg.engine_config("decode").max_model_len > 32768 + 32
    with pytest.raises(SystemExit):
        two_gpu.parse_args(["--threshold", "9000"])  # a long length would stay in PD
