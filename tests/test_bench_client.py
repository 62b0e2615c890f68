"""prfaas bench against a fake OpenAI-compatible streaming server on 127.0.0.1.

The fake server sends the first token ``ttft_s`` after a request arrives, then one every
``itl_s``; client-side latencies can only be longer (network, scheduling), so each test checks a
tight lower bound and a loose upper tolerance.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fastapi import FastAPI

from prfaas.bench.cli import main as cli_main
from prfaas.bench.cli import register
from prfaas.bench.client import BenchConfig, BenchError, request_body, run
from prfaas.bench.fake_server import FakeServerSpec, make_app, serve_in_thread
from prfaas.bench.metrics import summarize
from prfaas.bench.prompts import PromptBuilder
from prfaas.bench.workload import BenchRequest, prepare

TOL_MS = 100.0  # upper tolerance of percentiles on a shared, busy 2-core machine (seen: +36 ms)
ONE_MS = 100.0  # upper tolerance of a single request's latency (one late time slice shows here)


def parse(argv: list[str]):
    import argparse

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    return ap.parse_args(["bench", *argv])


def write_trace(path: Path, rows: list[tuple[int, int, int, list[int]]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": h})
            + "\n"
            for t, i, o, h in rows
        )
    )
    return path


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_known_latencies() -> None:
    # request n (30 ms apart, so arrival order is fixed) gets its first token 50 + 30 n ms after
    # arrival, then one token every 10 ms: TTFT 50..320 ms, TPOT 10 ms, E2E = TTFT + 50 ms
    spec = FakeServerSpec(ttft_s=0.05, itl_s=0.01, stall_s={n: 0.03 * n for n in range(10)})
    app, seen = make_app(spec)
    reqs = [BenchRequest(i, 0.03 * i, 64, 6) for i in range(10)]
    with serve_in_thread(app) as url:
        out = run(reqs, BenchConfig(url))
    assert out.model == "fake-model"
    assert [s.number for s in seen] == list(range(10))
    for r in out.results:
        assert r.ok and r.output_tokens == 6 and len(r.chunk_s) == 6
        want = 0.05 + 0.03 * r.index
        assert want - 0.002 <= r.ttft_s <= want + ONE_MS / 1000
        assert want + 0.05 - 0.002 <= r.e2e_s <= want + 0.05 + ONE_MS / 1000
    rep = summarize(out.results, out.duration_s, slo_ttft_s=0.185, slo_tpot_s=0.02)
    assert rep.total == rep.completed == 10 and rep.errors == {}
    for got, want in ((rep.ttft_ms.p50, 185.0), (rep.ttft_ms.p90, 293.0), (rep.ttft_ms.p99, 317.3)):
        assert want - 2 <= got <= want + TOL_MS
    assert 185.0 - 2 <= rep.ttft_ms.mean <= 185.0 + TOL_MS
    assert 235.0 - 2 <= rep.e2e_ms.p50 <= 235.0 + TOL_MS
    assert rep.tpot_ms.mean == pytest.approx(10.0, abs=3.0)
    assert rep.tpot_ms.p50 == pytest.approx(10.0, abs=3.0)
    assert rep.itl_ms.n == 50 and rep.itl_ms.mean == pytest.approx(10.0, abs=3.0)
    assert rep.output_tokens == 60 and rep.input_tokens == 640  # usage from the server
    # TTFT <= 185 ms: requests 0..4 (50..170 ms) meet it, 5.. (200 ms..) miss; a loaded machine
    # can only make requests late, so goodput is the count of those measured inside both SLOs
    met = [r.index for r in out.results if r.ttft_s <= 0.185 and r.tpot_s <= 0.02]
    assert rep.goodput.requests == len(met) and set(met) <= set(range(5))
    # the body that went out: streaming, max_tokens = output length, ignore-EOS options, usage
    b = seen[0].body
    assert b["stream"] is True and b["max_tokens"] == 6 and b["min_tokens"] == 6
    assert b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True}
    assert b["model"] == "fake-model" and len(b["prompt"]) == 64


def test_errors_counted_never_dropped() -> None:
    spec = FakeServerSpec(
        ttft_s=0.02, itl_s=0.005, fail_status={1: 429, 3: 500, 4: 429}, stall_s={5: 10.0}
    )
    app, seen = make_app(spec)
    reqs = [BenchRequest(i, 0.02 * i, 32, 3) for i in range(8)]
    with serve_in_thread(app) as url:
        # the timeout sits far from both the healthy requests (~0.04 s) and the stall (10 s), so
        # a loaded machine can't move a request across it
        out = run(reqs, BenchConfig(url, request_timeout_s=3.0))
    rep = summarize(out.results, out.duration_s)
    assert (rep.total, rep.completed, rep.failed) == (8, 4, 4)
    assert rep.errors == {"http_429": 2, "http_500": 1, "timeout": 1}
    by = {r.index: r for r in out.results}
    assert by[1].status == 429 and "fake error 429" in by[1].error_detail
    assert by[5].error == "timeout" and by[5].ttft_s is None
    assert all(by[i].ok for i in (0, 2, 6, 7))
    assert len(seen) == 8
    assert rep.ttft_ms.n == 4  # failed requests are not in the latency figures


def test_time_scaling_of_arrivals() -> None:
    app, seen = make_app(FakeServerSpec(ttft_s=0.005, itl_s=0.001))
    reqs = [BenchRequest(i, 0.25 * i, 16, 1) for i in range(4)]
    with serve_in_thread(app) as url:
        out = run(prepare(reqs, time_scale=2.0), BenchConfig(url))
    # open loop at the scaled times (0.5 s apart, unscaled would be 0.25: the tolerance tells them
    # apart and leaves a loaded machine 0.15 s of scheduling jitter)
    gaps = [b.t - a.t for a, b in zip(seen, seen[1:], strict=False)]
    assert gaps == pytest.approx([0.5, 0.5, 0.5], abs=0.15)
    assert [r.scheduled_s for r in out.results] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    for r in out.results:
        assert r.sent_s == pytest.approx(r.scheduled_s, abs=0.15)


def test_cli_trace_cap_lengths_prefixes_and_json(tmp_path: Path, capsys) -> None:
    trace = write_trace(
        tmp_path / "t.jsonl",
        [
            (0, 1200, 40, [0, 1, 2]),
            (10, 1100, 2, [0, 1, 3]),
            (20, 600, 3, [0, 4]),
            (30, 300, 4, [5]),
            (40, 900, 5, [0, 1]),
        ]
        + [(50 + 10 * k, 100, 1, [100 + k]) for k in range(10)],
    )
    app, seen = make_app(FakeServerSpec(ttft_s=0.01, itl_s=0.002))
    save = tmp_path / "out" / "bench.json"
    with serve_in_thread(app) as url:
        argv = ["--url", url + "/v1", "--trace", str(trace), "--max-requests", "5"]
        argv += ["--max-input-tokens", "1000", "--max-output-tokens", "4", "--block-tokens", "256"]
        argv += ["--time-scale", "0.5", "--slo-ttft", "1", "--slo-tpot", "1", "--json"]
        argv += ["--save", str(save), "--no-progress"]
        rc = cli_main(parse(argv))
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(seen) == 5 and rep["total"] == 5 and rep["completed"] == 5
    prompts = [s.body["prompt"] for s in sorted(seen, key=lambda s: len(s.body["prompt"]))]
    by_len = {len(p): p for p in prompts}
    assert [len(p) for p in prompts] == [300, 600, 900, 1000, 1000]
    assert sorted(s.body["max_tokens"] for s in seen) == [2, 3, 4, 4, 4]
    # rebuild the expected prompts: hash_ids -> 256-token blocks; equal leading ids, equal bytes
    pb = PromptBuilder(256, 0)
    expect = {
        pb.prompt(BenchRequest(i, 0, min(n, 1000), 1, tuple(h)))
        for i, (n, h) in enumerate(
            [(1200, [0, 1, 2]), (1100, [0, 1, 3]), (600, [0, 4]), (300, [5]), (900, [0, 1])]
        )
    }
    assert set(prompts) == expect
    a, b = (p for p in prompts if len(p) == 1000)
    assert a[:512] == b[:512] and a[512:768] != b[512:768]  # [0, 1, 2] vs [0, 1, 3]
    assert by_len[900][:512] == a[:512] and by_len[600][:256] == a[:256]
    assert by_len[600][256:512] != a[256:512] and by_len[300][:256] != a[:256]
    assert set(rep) == {
        "schema", "config", "total", "completed", "failed", "errors", "duration_s",
        "request_per_s", "output_tokens", "output_tokens_per_s", "input_tokens",
        "input_tokens_per_s", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput",
        "short_outputs", "send_lag_ms", "routing",
    }  # fmt: skip
    assert rep["schema"] == "prfaas.bench/1"
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(rep[k]) == {"n", "mean", "p50", "p90", "p99", "min", "max"}
        assert all(isinstance(v, int | float) for v in rep[k].values())
    assert rep["output_tokens"] == 2 + 3 + 4 + 4 + 4
    assert rep["goodput"]["requests"] == 5 and rep["goodput"]["fraction"] == 1.0
    assert rep["config"]["max_requests"] == 5 and rep["config"]["time_scale"] == 0.5
    assert rep["config"]["model"] == "fake-model" and rep["routing"] is None
    saved = json.loads(save.read_text())
    assert len(saved["per_request"]) == 5 and saved["total"] == 5
    assert {r["max_tokens"] for r in saved["per_request"]} == {2, 3, 4}
    assert [r["scheduled_s"] for r in saved["per_request"]] == pytest.approx(
        [0.0, 0.005, 0.01, 0.015, 0.02]
    )


def test_chat_endpoint_skips_role_chunk_and_no_extras() -> None:
    app, seen = make_app(FakeServerSpec(ttft_s=0.04, itl_s=0.01))
    cfg = BenchConfig(
        "http://127.0.0.1:1", endpoint="chat", ignore_eos="off", include_usage=False,
        extra_body={"temperature": 0.0},
    )  # fmt: skip
    with serve_in_thread(app) as url:
        out = run([BenchRequest(0, 0.0, 20, 3)], BenchConfig(**{**cfg.__dict__, "url": url}))
    r = out.results[0]
    assert r.ok and r.output_tokens == 3 and r.usage_output_tokens is None
    assert 0.038 <= r.ttft_s <= 0.04 + ONE_MS / 1000  # the role-only chunk is not a token
    b = seen[0].body
    assert seen[0].path == "/v1/chat/completions"
    assert b["messages"] == [{"role": "user", "content": b["messages"][0]["content"]}]
    assert len(b["messages"][0]["content"]) == 20
    assert "ignore_eos" not in b and "min_tokens" not in b and "stream_options" not in b
    assert b["temperature"] == 0.0


def test_routing_fields_summarised() -> None:
    def routing(n: int) -> dict:
        return {
            "prefill_cluster": "prfaas" if n % 2 == 0 else "pd",
            "decode_cluster": "pd",
            "transfer_bytes": 1000 * (n + 1),
            "cached_tokens": 512,
        }

    app, _ = make_app(FakeServerSpec(ttft_s=0.01, itl_s=0.001, routing=routing))
    reqs = [BenchRequest(i, 0.02 * i, 16, 2) for i in range(5)]
    with serve_in_thread(app) as url:
        out = run(reqs, BenchConfig(url))
    assert out.results[0].routing == routing(0)  # headers and the last chunk's prfaas object
    s = summarize(out.results, out.duration_s).routing
    assert s.requests_with_info == 5 and s.by_prefill_cluster == {"pd": 2, "prfaas": 3}
    assert (s.offloaded, s.offload_known) == (3, 5) and s.offload_fraction == pytest.approx(0.6)
    assert s.transfer_bytes_total == 15000 and s.cached_tokens_total == 2560


def test_max_duration_and_concurrency() -> None:
    app, _ = make_app(FakeServerSpec(ttft_s=0.01, itl_s=0.001, stall_s={1: 5.0}))
    reqs = [BenchRequest(0, 0.0, 8, 2), BenchRequest(1, 0.05, 8, 2)]
    reqs += [BenchRequest(2, 1.0, 8, 2), BenchRequest(3, 2.0, 8, 2)]
    with serve_in_thread(app) as url:
        out = run(reqs, BenchConfig(url, max_duration_s=0.4))
        rep = summarize(out.results, out.duration_s)
        assert rep.total == 4 and rep.errors == {"cancelled": 1, "not_sent": 2}
        assert out.results[0].ok and out.duration_s < 1.0
    # one in flight at a time: the second request waits for the first to finish
    both = [BenchRequest(0, 0.0, 8, 3), BenchRequest(1, 0.0, 8, 3)]
    app2, seen2 = make_app(FakeServerSpec(ttft_s=0.03, itl_s=0.01))
    with serve_in_thread(app2) as url2:
        out2 = run(both, BenchConfig(url2, concurrency=1))
    r0, r1 = out2.results
    assert r0.ok and r1.ok
    assert r1.sent_s >= r0.end_s - 0.001
    assert seen2[1].t - seen2[0].t >= 0.05 - 0.002
    assert summarize(out2.results, out2.duration_s).send_lag_ms.max >= 50.0 - 2


def test_unreachable_and_bad_config(tmp_path: Path, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BenchError, match="cannot reach"):
        run([BenchRequest(0, 0.0, 8, 1)], BenchConfig(url, connect_timeout_s=2.0))
    trace = write_trace(tmp_path / "t.jsonl", [(0, 10, 1, [0])])
    assert cli_main(parse(["--url", url, "--trace", str(trace), "--no-progress"])) == 2
    assert "cannot reach" in capsys.readouterr().err
    for argv, msg in (
        (["--url", url, "--synthetic", "lognormal"], "--synthetic needs --rate"),
        (["--url", url, "--trace", str(trace), "--rate", "2"], "--rate applies to --synthetic"),
        (["--url", url, "--trace", str(trace), "--extra-body", "[1]"], "JSON object"),
        (["--url", url, "--trace", str(trace), "--extra-body", "{"], "not valid JSON"),
        (["--url", url, "--trace", str(trace), "--slo-ttft", "0"], "--slo-ttft"),
        (["--url", "localhost:8000", "--trace", str(trace)], "http://"),
        (["--url", url, "--trace", str(tmp_path / "none.jsonl")], "no such trace"),
        (["--url", url, "--trace", str(trace), "--time-scale", "-1"], "--time-scale"),
    ):
        assert cli_main(parse(argv)) == 2
        assert msg in capsys.readouterr().err
    for kw, msg in (
        (dict(endpoint="embeddings"), "--endpoint"),
        (dict(concurrency=0), "--concurrency"),
        (dict(ignore_eos="yes"), "--ignore-eos"),
        (dict(request_timeout_s=0.0), "timeouts"),
        (dict(max_duration_s=0.0), "--max-duration"),
        (dict(max_connections=0), "--max-connections"),
    ):
        with pytest.raises(ValueError, match=msg):
            BenchConfig(url, **kw)
    with pytest.raises(ValueError, match="no requests"):
        run([], BenchConfig(url))


def test_model_resolution() -> None:
    app = FastAPI()  # no /v1/models: the name must come from --model
    with serve_in_thread(app) as url, pytest.raises(BenchError, match="pass --model"):
        run([BenchRequest(0, 0.0, 8, 1)], BenchConfig(url))
    body = request_body(BenchConfig(url, ignore_eos="min_tokens"), "m", "hi", 7)
    assert body == {
        "model": "m", "max_tokens": 7, "stream": True, "prompt": "hi",
        "stream_options": {"include_usage": True}, "min_tokens": 7,
    }  # fmt: skip
    assert BenchConfig("http://h:1/v1/").base_url == "http://h:1"


def test_connections_kept_alive_and_pool_bounded() -> None:
    app, seen = make_app(FakeServerSpec(ttft_s=0.005, itl_s=0.001))
    seq = [BenchRequest(i, 0.03 * i, 8, 2) for i in range(6)]  # each ends before the next
    burst = [BenchRequest(i, 0.0, 8, 2) for i in range(12)]  # 12 at once over 5 connections
    with serve_in_thread(app) as url:
        assert all(r.ok for r in run(seq, BenchConfig(url)).results)
        ports_seq = {s.client_port for s in seen}
        n = len(seen)
        assert all(r.ok for r in run(burst, BenchConfig(url, max_connections=5)).results)
        ports_burst = {s.client_port for s in seen[n:]}
    assert len(ports_seq) == 1  # one connection, reused (streams are read to the end)
    assert len(ports_burst) == 5


def test_sharded_pool() -> None:
    import asyncio

    import httpx

    from prfaas.bench.pool import ShardedClient

    async def go() -> None:
        p = ShardedClient(10, httpx.Timeout(1.0), shard_size=4)
        try:
            sizes = [c._transport._pool._max_connections for c in p.clients]
            assert sizes == [4, 3, 3]  # 10 connections over ceil(10 / 4) shards
            async with p.lease() as a, p.lease() as b, p.lease() as c, p.lease() as d:
                assert [a, b, c] == p.clients and d is p.clients[0]  # least busy first
                assert p.in_flight == [2, 1, 1]
            assert p.in_flight == [0, 0, 0]
        finally:
            await p.aclose()

    asyncio.run(go())
    with pytest.raises(ValueError, match="max_connections"):
        ShardedClient(0, None)  # type: ignore[arg-type]


def test_cli_synthetic_text_report_and_exit_codes(capsys) -> None:
    def routing(n: int) -> dict:
        return {"prefill_cluster": "prfaas", "offloaded": "true", "transfer_bytes": 2048}

    app, seen = make_app(FakeServerSpec(ttft_s=0.01, itl_s=0.002, routing=routing))
    with serve_in_thread(app) as url:
        argv = ["--url", url, "--synthetic", "lognormal", "--rate", "50", "--num-requests", "5"]
        argv += ["--output-len", "3", "--max-input-tokens", "200", "--concurrency", "2"]
        argv += ["--endpoint", "chat", "--model", "m1", "--no-progress", "--slo-ttft", "5"]
        assert cli_main(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "model=m1 endpoint=chat source=synthetic:lognormal:rate=50:n=5" in out
    assert "requests: 5 total, 5 completed, 0 failed" in out
    assert "goodput (TTFT <= 5000 ms): 5/5 requests (100.0%)" in out
    assert "prefill by prfaas=5" in out and "offloaded 5/5 (100.0%)" in out
    assert "KV bytes crossed 10.00 KiB (5 reported)" in out
    assert len(seen) == 5 and all(s.body["model"] == "m1" for s in seen)
    assert all(len(s.body["messages"][0]["content"]) <= 200 for s in seen)
    assert {s.body["max_tokens"] for s in seen} == {3}
    # nothing completes: exit status 1, every failure in the report
    app2, _ = make_app(FakeServerSpec(fail_status={n: 503 for n in range(3)}))
    with serve_in_thread(app2) as url2:
        argv = ["--url", url2, "--synthetic", "lognormal", "--rate", "100", "--num-requests", "3"]
        assert cli_main(parse([*argv, "--json", "--no-progress"])) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["errors"] == {"http_503": 3} and rep["ttft_ms"] is None


def test_stop_event_reports_what_ran() -> None:
    import asyncio

    from prfaas.bench.client import run_async

    app, seen = make_app(FakeServerSpec(ttft_s=0.01, itl_s=0.001, stall_s={1: 5.0}))
    reqs = [BenchRequest(0, 0.0, 8, 2), BenchRequest(1, 0.02, 8, 2), BenchRequest(2, 3.0, 8, 2)]

    async def go(url: str):
        # what Ctrl-C does in run(): set once request 0 has finished and request 1 is at the
        # server (stalled there for 5 s), driven by events rather than a timer that a loaded
        # machine could outrun; request 2 (due at 3 s) must never be sent
        stop = asyncio.Event()

        async def stop_when_ready() -> None:
            await first_done.wait()
            for _ in range(500):  # bounded: at most ~5 s
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.01)
            stop.set()

        first_done = asyncio.Event()
        watcher = asyncio.create_task(stop_when_ready())
        out = await run_async(
            reqs, BenchConfig(url), on_done=lambda r: r.index == 0 and first_done.set(), stop=stop
        )
        await watcher
        return out

    with serve_in_thread(app) as url:
        out = asyncio.run(go(url))
    assert [r.error for r in out.results] == [None, "cancelled", "not_sent"]
    assert out.results[0].ok and out.duration_s < 3.0 and len(seen) == 2
