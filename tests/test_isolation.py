"""One bad request never harms another (issue #18, point 2): the sampler is numerically safe for
every valid value; a request whose sampling fails ends alone with an error, its batch-mates
produce exactly what they produce without it; a decode node reports a failed request as an error
event (never a truncated answer with a made-up finish reason), and the gateway answers it with an
OpenAI error object."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import replace

import pytest
import torch

from prfaas import EngineConfig, LLMEngine, SamplingParams
from prfaas.engine.request import RequestOutput
from prfaas.engine.sampling import Sampler, SamplingError
from prfaas.server.gateway.handover import DecodeFailed
from prfaas.server.node.decode import Expectation
from prfaas.server.protocol import ErrorEvent, TokenEvent


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


# ------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1e-320},
        {"temperature": 5e-324, "seed": 3},
        {"temperature": 1e-6, "top_p": 1e-300},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 2.0, "top_p": 5e-324, "top_k": 2**62},
        {"temperature": 0.7, "top_k": 1},
    ],
)
def test_tiny_values_sample_the_most_likely_token(kw):
    """Tiny temperatures are greedy; a tiny top_p keeps only the most likely token."""
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1)) * 30
    s = Sampler(SamplingParams(**kw), default_seed=0)
    assert [s.sample(logits, i) for i in range(5)] == [int(logits.argmax())] * 5


def test_extreme_logits_still_sample():
    x = torch.full((256,), -1e30)
    x[7] = 1e30
    s = Sampler(SamplingParams(temperature=1e-5, top_p=0.5), default_seed=0)
    assert s.sample(x, 0) == 7
    s = Sampler(SamplingParams(temperature=2.0), default_seed=0)
    assert s.sample(torch.zeros(256), 0) in range(256)
    with pytest.raises(SamplingError):
        s.sample(torch.full((256,), float("nan")), 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-9])
def test_non_finite_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=bad)


# ------------------------------------------------------------------------ the engine step


def run(eng: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (p, sp) in reqs.items():
        eng.add_request(p, sp, rid)
    got: dict[str, RequestOutput] = {}
    for _ in range(1000):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o
    return got


def test_a_failing_sampler_ends_its_request_alone(tiny_model):
    sp = SamplingParams(temperature=0.8, seed=4, max_tokens=10, ignore_eos=True)
    mates = {f"ok{i}": (prompt(i, 30 + 20 * i), sp) for i in range(3)}
    alone = run(LLMEngine(EngineConfig(model="tiny"), model=tiny_model), dict(mates))

    eng = LLMEngine(EngineConfig(model="tiny"), model=tiny_model)
    eng.add_request(prompt(9, 40), sp, "bad")
    bad = eng.requests["bad"]

    def boom(logits: torch.Tensor, index: int) -> int:
        if index == 3:
            raise RuntimeError("injected sampling failure")
        return Sampler.sample(bad.sampler, logits, index)

    bad.sampler.sample = boom
    got = run(eng, dict(mates))
    assert got["bad"].finish_reason == "error" and "injected" in got["bad"].error
    assert len(got["bad"].token_ids) == 3
    for rid, o in alone.items():  # batch-mates: token for token what they produce alone
        assert (got[rid].token_ids, got[rid].finish_reason) == (o.token_ids, "length")
    assert not eng.has_unfinished() and eng.cache.usage() == 0


# ------------------------------------------------------------------------ node and gateway


def test_decode_node_reports_a_failed_request_as_an_error_event():
    async def main() -> list:
        q: asyncio.Queue = asyncio.Queue()
        exp = Expectation("r", SamplingParams(), asyncio.get_running_loop(), q)
        base = {"request_id": "r", "prompt_token_ids": [1], "num_cached_tokens": 0}
        exp.on_output(RequestOutput(token_ids=[5], finished=False, finish_reason=None, **base))
        exp.on_output(
            RequestOutput(
                token_ids=[5, 6], finished=True, finish_reason="error", error="boom", **base
            )
        )
        await asyncio.sleep(0.05)
        return [q.get_nowait() for _ in range(q.qsize())]

    tok, err = asyncio.run(main())
    assert isinstance(tok, TokenEvent) and tok.token_ids == [5]
    assert isinstance(err, ErrorEvent) and err.code == "request_failed" and err.message == "boom"


def test_gateway_errors_are_openai_error_objects():
    e = DecodeFailed("sampling failed", "request_failed").api_error()
    assert e.status == 500 and e.body()["error"]["code"] == "request_failed"
    assert e.body()["error"]["type"] == "server_error"
    e = DecodeFailed("node gone").api_error()
    assert e.status == 502 and e.body()["error"]["code"] == "decode_node_failed"


# ------------------------------------------------------------------------ authentication units


def test_placeholder_secret_is_refused_off_loopback():
    from prfaas.server.auth import check_node_secret

    placeholder = "prfaas-local-dev-secret-change-me"
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_node_secret(host, placeholder)
    for host in ("0.0.0.0", "10.1.2.3", "node-7.cluster"):
        with pytest.raises(ValueError, match="placeholder"):
            check_node_secret(host, placeholder)
        check_node_secret(host, "a-secret-of-our-own-0123456789")


def test_prfaas_node_off_loopback_with_placeholder_secret_exits_2(tmp_path):
    import subprocess
    import sys

    import yaml

    from prfaas.server.config import DEFAULT_CONFIG

    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["clusters"][1]["nodes"][0]["host"] = "0.0.0.0"
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "prfaas.cli", "node", "--config", str(path), "--node", "pd-p0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "placeholder secret" in r.stdout + r.stderr


def test_pipelined_decode_with_a_full_cache_preempts_instead_of_failing(tiny_model):
    """Greedy rows that all need a new cache block in the same pipelined step, with fewer blocks
    free than rows: the engine must not raise (that aborted every batch-mate), and the tokens are
    those of the synchronous engine."""
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    reqs = {f"r{i}": (prompt(40 + i, 13), sp) for i in range(3)}
    kw = {"model": "tiny", "num_blocks": 4, "max_model_len": 64, "enable_prefix_cache": False}
    want = run(LLMEngine(EngineConfig(async_decode=False, **kw), model=tiny_model), dict(reqs))
    eng = LLMEngine(EngineConfig(async_decode=True, **kw), model=tiny_model)
    got = run(eng, dict(reqs))
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert all(o.finish_reason == "length" for o in got.values())
    assert eng.num_pipelined_steps > 0 and eng.num_preemptions > 0


def test_a_failed_engine_step_ends_only_the_requests_it_ran(tiny_model):
    """A model step that raises (in the engine thread) ends the requests of that step, with the
    error; requests waiting for a slot or for their KV go on, and produce what they produce
    without the failure."""
    from prfaas.server.node.engine_worker import EngineWorker

    sp = SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)
    reqs = {rid: (prompt(60 + k, 30), sp) for k, rid in enumerate(("a", "b", "c", "d"))}
    cfg = EngineConfig(model="tiny", max_num_seqs=2)
    want = run(LLMEngine(cfg, model=tiny_model), {k: reqs[k] for k in ("c", "d")})
    eng = LLMEngine(cfg, model=tiny_model)
    real_step, calls = eng.runner.step, []

    def flaky(*args, **kw):  # the first step (a and b: two slots) fails
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return real_step(*args, **kw)

    eng.runner.step = flaky
    w = EngineWorker(eng).start()
    got: dict = {}
    done = threading.Event()

    def on_out(o: RequestOutput) -> None:
        if o.finished:
            got[o.request_id] = o
            if len(got) == 4:
                done.set()

    def submit(e: LLMEngine) -> None:  # all at once, before any step
        for rid, (p, s) in reqs.items():
            w.subscribe(rid, on_out)
            e.add_request(p, s, rid)
        e.expect_kv("w", prompt(70, 30), sp)

    try:
        w.call(submit).result(30)
        assert done.wait(120)
        waiting = w.call(lambda e: e.stats().waiting_for_kv).result(30)
        w.call(lambda e: e.abort("w")).result(30)
    finally:
        w.stop()
    for rid in ("a", "b"):
        assert got[rid].finish_reason == "abort" and "injected step failure" in got[rid].error
    for rid in ("c", "d"):  # not in the failed step: token for token as without it
        assert (got[rid].token_ids, got[rid].finish_reason) == (want[rid].token_ids, "length")
    assert waiting == 1  # still waiting for its KV
    assert eng.cache.usage() == 0


def test_a_step_failing_in_its_update_still_reports_what_finished(tiny_model):
    """A step that fails while its results are applied: a request that finished in it before the
    failure is reported as finished (its stream would otherwise wait forever), the request whose
    update failed ends with the error."""
    eng = LLMEngine(EngineConfig(model="tiny"), model=tiny_model)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.add_request(prompt(80, 20), one, "short")
    eng.add_request(prompt(81, 20), replace(one, max_tokens=5), "bad")
    real = eng.scheduler._append_token

    def flaky(req, tok: int) -> None:
        if req.request_id == "bad":
            raise RuntimeError("injected update failure")
        real(req, tok)

    eng.scheduler._append_token = flaky
    with pytest.raises(RuntimeError, match="injected") as e:
        eng.step()  # both rows in this step: short finishes first, then bad's update fails
    outs = {o.request_id: o for o in eng.fail_step(e.value)}
    assert outs["short"].finish_reason == "length" and len(outs["short"].token_ids) == 1
    assert outs["bad"].finish_reason == "abort" and "injected update failure" in outs["bad"].error
    assert not eng.has_unfinished() and eng.cache.usage() == 0
