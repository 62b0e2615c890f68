"""prfaas.bench metrics and routing summaries on hand-built request results (exact figures)."""

from __future__ import annotations

import pytest

from prfaas.bench import routing as rt
from prfaas.bench.client import RequestResult
from prfaas.bench.metrics import dist_ms, summarize
from prfaas.bench.report import format_text


def ok_result(i: int, ttft: float, itl: float, n: int, **kw) -> RequestResult:
    chunks = [ttft + k * itl for k in range(n)]
    r = RequestResult(i, scheduled_s=0.1 * i, input_len=100, max_tokens=n, sent_s=0.1 * i)
    r.ok, r.status, r.ttft_s, r.chunk_s, r.e2e_s = True, 200, ttft, chunks, chunks[-1]
    r.end_s = r.sent_s + r.e2e_s
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def failed(i: int, kind: str) -> RequestResult:
    r = RequestResult(i, scheduled_s=0.0, input_len=100, max_tokens=4, sent_s=0.0, end_s=0.01)
    r.error = kind
    return r


def test_dist_exact_percentiles() -> None:
    d = dist_ms([0.05 + 0.01 * k for k in range(10)])  # 50, 60, ..., 140 ms
    assert d is not None and d.n == 10
    assert d.mean == pytest.approx(95.0)
    assert d.p50 == pytest.approx(95.0)
    assert d.p90 == pytest.approx(131.0)  # linear interpolation: 130 + 0.1 * 10
    assert d.p99 == pytest.approx(139.1)
    assert (d.min, d.max) == pytest.approx((50.0, 140.0))
    assert dist_ms([]) is None


def test_summarize_latencies_throughput_errors_goodput() -> None:
    res = [
        ok_result(0, 0.05, 0.010, 5),  # TPOT 10 ms, E2E 90 ms
        ok_result(1, 0.20, 0.010, 3),  # TTFT misses a 100 ms SLO
        ok_result(2, 0.06, 0.030, 4),  # TPOT 30 ms misses a 20 ms SLO
        ok_result(3, 0.07, 0.0, 1),  # single token: TPOT undefined, not checked
        failed(4, "http_429"),
        failed(5, "http_429"),
        failed(6, "timeout"),
    ]
    rep = summarize(res, duration_s=2.0, slo_ttft_s=0.1, slo_tpot_s=0.02, config={"url": "u"})
    assert (rep.total, rep.completed, rep.failed) == (7, 4, 3)
    assert rep.errors == {"http_429": 2, "timeout": 1}
    assert rep.request_per_s == pytest.approx(2.0)
    assert rep.output_tokens == 13 and rep.output_tokens_per_s == pytest.approx(6.5)
    assert rep.input_tokens == 400 and rep.input_tokens_per_s == pytest.approx(200.0)
    assert rep.ttft_ms.n == 4 and rep.ttft_ms.mean == pytest.approx(95.0)
    assert rep.ttft_ms.p50 == pytest.approx(65.0)
    assert rep.tpot_ms.n == 3 and rep.tpot_ms.mean == pytest.approx(50.0 / 3)
    assert rep.tpot_ms.p50 == pytest.approx(10.0)
    assert rep.itl_ms.n == 4 + 2 + 3
    assert rep.itl_ms.mean == pytest.approx((6 * 10 + 3 * 30) / 9)
    assert sorted([rep.e2e_ms.min, rep.e2e_ms.max]) == pytest.approx([70.0, 220.0])
    g = rep.goodput
    assert (g.requests, g.slo_ttft_ms, g.slo_tpot_ms) == (2, 100.0, 20.0)  # requests 0 and 3
    assert g.fraction == pytest.approx(2 / 7) and g.request_per_s == pytest.approx(1.0)
    assert rep.short_outputs == 0 and rep.routing is None
    d = rep.to_dict()
    assert d["schema"] == "prfaas.bench/1" and d["ttft_ms"]["p90"] == pytest.approx(rep.ttft_ms.p90)
    text = format_text(rep)
    assert "7 total, 4 completed, 3 failed" in text and "http_429=2, timeout=1" in text
    assert "goodput (TTFT <= 100 ms, TPOT <= 20 ms): 2/7" in text


def test_summarize_usage_counts_and_no_slo() -> None:
    # the server packs 8 tokens into 4 chunks: usage wins for TPOT and throughput, ITL per chunk
    r = ok_result(0, 0.05, 0.02, 4, usage_output_tokens=8, usage_prompt_tokens=120)
    r.max_tokens = 10
    rep = summarize([r], duration_s=1.0)
    assert rep.output_tokens == 8 and rep.input_tokens == 120
    assert rep.tpot_ms.mean == pytest.approx(60.0 / 7)
    assert rep.itl_ms.mean == pytest.approx(20.0)
    assert rep.goodput is None and rep.short_outputs == 1
    only_ttft = summarize([r], duration_s=1.0, slo_ttft_s=0.04)
    assert only_ttft.goodput.requests == 0 and only_ttft.goodput.slo_tpot_ms is None


def test_summarize_bad_input() -> None:
    with pytest.raises(ValueError, match="duration"):
        summarize([], duration_s=-1.0)
    with pytest.raises(ValueError, match="--slo-ttft"):
        summarize([], duration_s=1.0, slo_ttft_s=0.0)
    with pytest.raises(ValueError, match="--slo-tpot"):
        summarize([], duration_s=1.0, slo_tpot_s=-2.0)
    rep = summarize([failed(0, "connect_error")], duration_s=0.0)
    assert rep.total == 1 and rep.errors == {"connect_error": 1} and rep.request_per_s == 0.0
    assert rep.ttft_ms is None and "n=0" in format_text(rep)


def test_routing_parsing() -> None:
    h = rt.from_headers(
        [
            ("X-PrfaaS-Prefill-Cluster", "prfaas"),
            ("x-prfaas-cached-tokens", "1024"),
            ("x-prfaas-offloaded", "true"),
            ("x-prfaas-transfer-bytes", "oops"),  # kept as given when not an int
            ("x-other", "1"),
            ("x-prfaas-", "empty"),
        ]
    )
    assert h == {
        "prefill_cluster": "prfaas",
        "cached_tokens": 1024,
        "offloaded": True,
        "transfer_bytes": "oops",
    }
    r: dict = {}
    rt.merge_body(r, {"usage": {"prompt_tokens_details": {"cached_tokens": 512}}})
    assert r == {"cached_tokens": 512}
    rt.merge_body(r, {"prfaas": {"cached_tokens": "2048", "decode_cluster": "pd", "x": [1]}})
    assert r == {"cached_tokens": 2048, "decode_cluster": "pd", "x": [1]}
    rt.merge_body(r, {"usage": {"prompt_tokens_details": {"cached_tokens": 1}}})
    assert r["cached_tokens"] == 2048  # the prfaas field wins over usage
    assert (
        rt.offloaded({"offloaded": False, "prefill_cluster": "a", "decode_cluster": "b"}) is False
    )
    assert rt.offloaded({"prefill_cluster": "prfaas", "decode_cluster": "pd"}) is True
    assert rt.offloaded({"prefill_cluster": "pd", "decode_cluster": "pd"}) is False
    assert rt.offloaded({"prefill_cluster": "prfaas"}) is None


def test_routing_summary() -> None:
    res = [ok_result(i, 0.05, 0.01, 2) for i in range(5)] + [failed(5, "http_500")]
    res[0].routing = {"prefill_cluster": "prfaas", "decode_cluster": "pd", "transfer_bytes": 3000}
    res[1].routing = {"prefill_cluster": "pd", "decode_cluster": "pd", "cached_tokens": 512}
    res[2].routing = {"prefill_cluster": "prfaas", "offloaded": True, "transfer_bytes": 1000}
    res[3].routing = {"cached_tokens": 1024}
    res[5].routing = {"prefill_cluster": "pd"}  # failed requests' routing still counts
    s = summarize(res, 1.0).routing
    assert s.requests_with_info == 5
    assert s.by_prefill_cluster == {"pd": 2, "prfaas": 2}
    assert (s.offloaded, s.offload_known, s.offload_fraction) == (2, 3, pytest.approx(2 / 3))
    assert (s.cached_tokens_total, s.cached_tokens_known) == (1536, 2)
    assert (s.transfer_bytes_total, s.transfer_bytes_known) == (4000, 2)
    assert "offloaded 2/3 (66.7%)" in format_text(summarize(res, 1.0))


def test_token_chunks() -> None:
    from prfaas.bench.client import _is_token_chunk

    def comp(text, finish=None):
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    def chat(delta, finish=None):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    assert _is_token_chunk(comp("a"))
    assert _is_token_chunk(comp(""))  # a token whose bytes are not text yet
    assert _is_token_chunk(comp("z", "length"))  # last token with the finish
    assert not _is_token_chunk(comp("", "length"))  # finish only
    assert not _is_token_chunk({"choices": [], "usage": {"completion_tokens": 3}})
    assert _is_token_chunk(chat({"content": "hi"}))
    assert _is_token_chunk(chat({"reasoning_content": "hm"}))
    assert not _is_token_chunk(chat({"role": "assistant", "content": ""}))  # vLLM's first chunk
    assert not _is_token_chunk(chat({}, "stop"))
    assert not _is_token_chunk({"choices": ["junk"]})
