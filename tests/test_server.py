"""End-to-end: a deployment started exactly as ``prfaas up`` starts it (node OS processes on
loopback, tiny model on CPU, emulated PrfaaS->PD link, the gateway), driven over HTTP and with the
official ``openai`` client.  One deployment for the module (1 PrfaaS node, 1 PD-P, 2 PD-D); the
fault tests run last because they kill nodes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from deploy_process import running_deployment

from prfaas import LLM, SamplingParams
from prfaas.server.auth import control_headers

THRESHOLD = 256
MAX_INFLIGHT = 4
# tiny model payload: 6 KDA layers (state 2x32x32 fp32 + conv 3x64x3 fp32) + 2 MLA layers x 40 fp32
KDA_BYTES = 6 * (2 * 32 * 32 * 4 + 3 * 64 * 3 * 4)
MLA_BYTES_PER_TOKEN = 2 * 40 * 4

CONFIG = {
    "model": "tiny",
    "device": "cpu",
    "secret": "test-secret-0123456789abcdef",
    "transfer_backend": "tcp",
    "engine": {"max_num_seqs": 8, "max_model_len": 1024, "checkpoint_interval": 64},
    "clusters": [
        {"name": "prfaas", "kind": "prfaas", "nodes": [{"name": "prfaas-0", "role": "prefill"}]},
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [
                {"name": "pd-p0", "role": "prefill"},
                {"name": "pd-d0", "role": "decode"},
                {"name": "pd-d1", "role": "decode"},
            ],
        },
    ],
    "links": [{"src": "prfaas", "dst": "pd", "gbps": 2.0, "rtt_ms": 4.0}],
    "router": {
        "threshold": THRESHOLD,
        "max_inflight": MAX_INFLIGHT,
        "poll_interval_s": 0.2,
        "prefill_timeout_s": 30.0,
    },
}


def rand_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    with running_deployment(CONFIG, d, start_timeout_s=120, stop_timeout_s=30) as info:
        yield info
    for n in info["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(n["pid"], 0)


@pytest.fixture(scope="module")
def url(deployment) -> str:
    return deployment["url"]


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny")


def complete(url: str, prompt, **kw) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def node_info(url: str, name: str) -> dict:
    nodes = httpx.get(url + "/admin/nodes").json()["nodes"]
    return next(n for n in nodes if n["name"] == name)


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


# ------------------------------------------------------------------------ normal operation


def test_models_and_health(url):
    m = httpx.get(url + "/v1/models").json()
    assert [x["id"] for x in m["data"]] == ["tiny"]
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok"
    assert sorted(h["nodes"]) == ["pd-d0", "pd-d1", "pd-p0", "prfaas-0"]


@pytest.mark.parametrize("n, seeded", [(40, False), (300, False), (300, True), (90, True)])
def test_outputs_identical_to_offline_engine(url, offline, n, seeded):
    prompt = rand_prompt(n, n)
    kw = {"temperature": 0.8, "top_p": 0.9, "seed": 1234} if seeded else {"temperature": 0}
    r = complete(url, prompt, max_tokens=12, ignore_eos=True, **kw)
    assert r.status_code == 200, r.text
    b = r.json()
    sp = SamplingParams(
        temperature=kw["temperature"],
        top_p=kw.get("top_p", 1.0),
        seed=kw.get("seed"),
        max_tokens=12,
        ignore_eos=True,
    )
    (want,) = offline.generate([prompt], sp)
    assert b["prfaas"]["token_ids"] == want.token_ids
    assert b["choices"][0]["text"] == want.text
    assert b["choices"][0]["finish_reason"] == "length"
    assert b["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": 12,
        "total_tokens": n + 12,
        "prompt_tokens_details": {"cached_tokens": b["prfaas"]["cached_tokens"]},
    }


def test_long_prompts_prefill_in_prfaas_short_in_pd(url):
    short = complete(url, rand_prompt(1, 200))
    long = complete(url, rand_prompt(2, 400))
    assert short.status_code == long.status_code == 200
    s, lg = short.json()["prfaas"], long.json()["prfaas"]
    assert (s["prefill_cluster"], s["prefill_node"], s["offloaded"]) == ("pd", "pd-p0", False)
    assert (lg["prefill_cluster"], lg["prefill_node"], lg["offloaded"]) == (
        "prfaas",
        "prfaas-0",
        True,
    )
    assert lg["link"] == "prfaas->pd" and s["link"] is None
    # the whole uncached cache crossed: KDA states + MLA KV of every prompt token
    assert s["transfer_bytes"] == KDA_BYTES + 199 * MLA_BYTES_PER_TOKEN
    assert lg["transfer_bytes"] == KDA_BYTES + 399 * MLA_BYTES_PER_TOKEN
    # headers say the same as the body
    h = long.headers
    assert h["x-prfaas-prefill-cluster"] == "prfaas"
    assert h["x-prfaas-prefill-node"] == "prfaas-0"
    assert int(h["x-prfaas-transfer-bytes"]) == lg["transfer_bytes"]
    assert int(h["x-prfaas-cached-tokens"]) == lg["cached_tokens"] == 0
    assert float(h["x-prfaas-transfer-ms"]) > 0


def test_prefix_hit_reduces_bytes_that_cross(url):
    base = rand_prompt(3, 400)
    a = complete(url, base).json()["prfaas"]
    b = complete(url, base + rand_prompt(4, 40)).json()["prfaas"]
    assert a["prefill_cluster"] == b["prefill_cluster"] == "prfaas"
    assert a["decode_node"] == b["decode_node"]
    # the decode node holds the 400-token prefix (25 blocks of 16): only the tail crosses (the
    # decode node computes the last prompt token itself: 39 tokens)
    assert b["decode_prefix_tokens"] == 400
    assert b["transfer_bytes"] == KDA_BYTES + 39 * MLA_BYTES_PER_TOKEN
    assert a["transfer_bytes"] - b["transfer_bytes"] == 360 * MLA_BYTES_PER_TOKEN
    # and the PrfaaS node reused its own prefix up to the last state checkpoint (6 x 64 tokens)
    assert b["cached_tokens"] == 384


def test_gateway_observer_reads_link_use_from_real_transfers(deployment, url):
    """The gateway's polling feeds the observer's link estimator from the PrfaaS node's sender
    meters (bytes on the wire, busy seconds, summed over its peers into monotone totals): a poll
    after an offloaded request reads that request's bytes and the time its link was busy.  A second
    gateway's view (``Router``, the same polling code) on a clock the test steps by 1 s."""
    from prfaas.server.config import load_deploy_config
    from prfaas.server.gateway.node_client import NodeEndpoint
    from prfaas.server.gateway.router import Router

    cfg = load_deploy_config(Path(deployment["dir"], "deploy.yaml"))
    nodes = httpx.get(url + "/admin/nodes").json()["nodes"]
    router = Router(
        cfg, [NodeEndpoint(n["name"], n["cluster"], n["role"], n["url"]) for n in nodes]
    )
    clock = [1000.0]
    router.sched.clock = lambda: clock[0]

    async def polled_around_one_request():
        await router.poll_once()
        before = router.live.node_state["prfaas-0"].links["pd"]
        t0 = time.monotonic()
        r = await asyncio.to_thread(complete, url, rand_prompt(21, 600))
        wall = time.monotonic() - t0
        clock[0] += 1.0
        await router.poll_once()
        await router.nodes.http.aclose()
        return r, before, router.live.node_state["prfaas-0"].links["pd"], wall

    r, before, after, wall = asyncio.run(polled_around_one_request())
    assert r.status_code == 200, r.text
    p = r.json()["prfaas"]
    assert p["offloaded"] and p["transfer_bytes"] == KDA_BYTES + 599 * MLA_BYTES_PER_TOKEN
    # the node: every KV byte of the request went on the wire (plus its frames' headers), and the
    # link was busy for part of the request's time
    wire = after.bytes_total - before.bytes_total
    assert p["transfer_bytes"] <= wire <= p["transfer_bytes"] + 65536
    assert 0 < after.busy_s - before.busy_s <= wall
    # the gateway's observer: that many bytes in the stepped 1 s interval, busy for that long
    ls = router.sched.observer.snapshot(clock[0]).links[("prfaas", "pd")]
    assert ls.throughput_gbps == pytest.approx(wire * 8 / 1e9)
    assert ls.busy_fraction == pytest.approx(min(after.busy_s - before.busy_s, 1.0))
    assert 0 < ls.capacity_gbps <= 2.0  # the estimate stays under the link's nominal rate
    assert 0 < ls.throughput_gbps / ls.capacity_gbps < 1


def test_openai_client_streaming_and_not(url, offline):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = "The prefill cluster and the decode cluster "
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    # OpenAI's include_usage: usage null in every chunk, then one with no choices and the usage
    last, usage_chunk = chunks[-2], chunks[-1]
    assert usage_chunk.choices == [] and all(c.usage is None for c in chunks[:-1])
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert last.model_extra["prfaas"]["prefill_cluster"] == "pd"
    (want,) = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=10))
    assert full.choices[0].text == want.text

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=msgs, max_tokens=6, seed=5, temperature=1.0
    )
    chat = raw.parse()
    templated = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    (want,) = offline.generate([templated], SamplingParams(temperature=1.0, seed=5, max_tokens=6))
    assert chat.choices[0].message.content == want.text
    assert chat.usage.prompt_tokens == len(templated.encode())
    assert raw.headers["x-prfaas-decode-node"] == chat.model_extra["prfaas"]["decode_node"]
    streamed = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=6, seed=5, temperature=1.0, stream=True
        )
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text


def test_stop_strings_and_stop_token_ids(url, offline):
    prompt = rand_prompt(5, 30)
    (ref,) = offline.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )
    # a stop string taken from the middle of the reference text
    i = next(k for k in range(4, len(ref.text) - 2) if "\ufffd" not in ref.text[k : k + 2])
    stop = ref.text[i : i + 2]
    b = complete(url, prompt, max_tokens=24, ignore_eos=True, stop=[stop, "never-appears"]).json()
    assert b["choices"][0]["text"] == ref.text[: ref.text.find(stop)]
    assert b["choices"][0]["finish_reason"] == "stop"
    # streamed: the same text, the stop string never leaks out
    r = httpx.post(
        url + "/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
            "stop": stop,
            "stream": True,
        },
        timeout=60,
    )
    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text[: ref.text.find(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "prfaas" in events[-1]
    # token-id stops: exactly the offline engine's behaviour
    sid = ref.token_ids[5]
    b = complete(url, prompt, max_tokens=24, stop_token_ids=[sid]).json()
    (want,) = offline.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[sid])
    )
    assert (
        b["prfaas"]["token_ids"] == want.token_ids == ref.token_ids[: ref.token_ids.index(sid) + 1]
    )
    assert b["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x"}, 400, "model"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
        ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "seed": "s"}, 400, "seed"),
        ({"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x" * 1100}, 400, "prompt"),
    ],
)
def test_malformed_requests_get_openai_errors(url, body, status, param):
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_json_and_chat(url):
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=5)


def test_overload_gets_429_with_retry_after(url):
    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, dict, dict]:
        r = await c.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": rand_prompt(100 + i, 50),
                "max_tokens": 40,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        return r.status_code, dict(r.headers), r.json()

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(12)))

    results = asyncio.run(burst())
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 429}, [r[2] for r in results if r[0] not in (200, 429)]
    assert set(codes) <= {200, 429}  # nothing dropped, nothing else
    assert codes.count(200) >= 1 and codes.count(429) >= 12 - 2 * MAX_INFLIGHT
    for code, headers, body in results:
        if code == 429:
            assert headers["retry-after"] == "1"
            assert body["error"]["type"] == "rate_limit_error"
        else:
            assert body["usage"]["completion_tokens"] == 40
    wait_for(lambda: httpx.get(url + "/metrics").text.count("prfaas_inflight_requests 0.0") == 1)


def test_metrics(url):
    text = httpx.get(url + "/metrics").text
    for needle in [
        "prfaas_ttft_seconds_count",
        "prfaas_tpot_seconds_count",
        'prfaas_route_decisions_total{offloaded="true",prefill_cluster="prfaas"}',
        'prfaas_route_decisions_total{offloaded="false",prefill_cluster="pd"}',
        'prfaas_node_queue_depth{cluster="pd",node="pd-d0"}',
        'prfaas_link_gbps{dst="pd",src="prfaas"}',
        'prfaas_link_capacity_gbps{dst="pd",src="prfaas"} 2.0',
        'prfaas_prefix_cache_hit_rate{cluster="prfaas",node="prfaas-0"}',
        'prfaas_requests_total{outcome="rejected_429"}',
        "prfaas_kv_transfer_bytes_total",
        'prfaas_kv_transfer_seconds_count{dst_cluster="pd",src_cluster="prfaas"}',
        'vllm:time_to_first_token_seconds_count{model_name="tiny"}',
        'vllm:time_per_output_token_seconds_count{model_name="tiny"}',
        'vllm:e2e_request_latency_seconds_count{model_name="tiny"}',
        'vllm:request_success_total{finished_reason="length",model_name="tiny"}',
        'vllm:generation_tokens_total{model_name="tiny"}',
        'vllm:num_requests_running{model_name="tiny"}',
    ]:
        assert needle in text, needle
    # every node serves its own: vLLM's engine gauges, ours (KV bytes sent, link readings)
    node = httpx.get(node_info(url, "prfaas-0")["url"] + "/metrics").text
    labels = 'cluster="prfaas",engine="prfaas-0",model_name="tiny",role="prefill"'
    link = 'cluster="prfaas",dst_cluster="pd",engine="prfaas-0",model_name="tiny",role="prefill"'
    for needle in [
        f"vllm:num_requests_waiting{{{labels}}} 0.0",
        f"vllm:kv_cache_usage_perc{{{labels}}}",
        f"prfaas_node_kv_bytes_sent_total{{{link}}}",
        f"prfaas_node_link_capacity_gbps{{{link}}} 2.0",
    ]:
        assert needle in node, needle
    decode = httpx.get(node_info(url, "pd-d0")["url"] + "/metrics").text
    assert 'prfaas_node_kv_imports_total{cluster="pd",engine="pd-d0"' in decode


# ------------------------------------------------------------------------ OpenAI / vLLM features


def test_logprobs_equal_the_offline_engines(url, offline):
    """Completions and chat, streamed or not: each token's logprob and top alternatives are the
    engine's (``tests/test_sampling_features.py`` checks those against log_softmax of the
    model's logits)."""
    prompt = rand_prompt(21, 40)
    sp = SamplingParams(temperature=0.7, seed=9, max_tokens=6, ignore_eos=True, logprobs=3)
    (want,) = offline.generate([prompt], sp)
    kw = {"max_tokens": 6, "temperature": 0.7, "seed": 9, "ignore_eos": True}
    b = complete(url, prompt, logprobs=3, **kw).json()
    lp = b["choices"][0]["logprobs"]
    assert b["prfaas"]["token_ids"] == want.token_ids
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    assert all(len(t) >= 1 for t in lp["top_logprobs"]) and len(lp["tokens"]) == 6
    assert lp["text_offset"][0] == 0
    # chat, streamed: one content entry per token, top_logprobs 2 of the engine's 3
    msgs = [{"role": "user", "content": "q"}]
    templated = "<|user|>\nq\n<|assistant|>\n"
    (cw,) = offline.generate([templated], sp)
    body = {"model": "tiny", "messages": msgs, "logprobs": True, "top_logprobs": 3, **kw}
    r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    content = [e for ev in events for e in ev["choices"][0]["logprobs"]["content"]]
    assert [e["logprob"] for e in content] == pytest.approx(
        [x.logprob for x in cw.logprobs], abs=1e-5
    )
    top = [[t["logprob"] for t in e["top_logprobs"]] for e in content]
    assert top == [pytest.approx([v for _, v in x.top], abs=1e-5) for x in cw.logprobs]
    assert all(
        e["bytes"] == ([t] if t < 256 else []) for e, t in zip(content, cw.token_ids, strict=True)
    )
    assert events[0]["id"].startswith("chatcmpl-")
    nb = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert nb["id"].startswith("chatcmpl-") and nb["object"] == "chat.completion"
    assert [e["logprob"] for e in nb["choices"][0]["logprobs"]["content"]] == pytest.approx(
        [x.logprob for x in cw.logprobs], abs=1e-5
    )


def test_n_choices_share_the_prompts_prefill(url, offline):
    prompt = rand_prompt(22, 200)  # PD-P; 3 checkpoints of 64 tokens
    kw = {"max_tokens": 5, "temperature": 0.9, "seed": 40, "extra_body": {"ignore_eos": True}}
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt=prompt, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, c in enumerate(r.choices):
        sp = SamplingParams(temperature=0.9, seed=40 + j, max_tokens=5, ignore_eos=True)
        (want,) = offline.generate([prompt], sp)
        assert c.model_extra["prfaas"]["token_ids"] == want.token_ids and c.text == want.text
    # the later choices took the prompt's prefix from the caches the first one filled
    first, *later = [c.model_extra["prfaas"] for c in r.choices]
    assert first["cached_tokens"] == 0 and all(p["cached_tokens"] == 192 for p in later)
    # a decode node the first choice used holds the prefix too (least-loaded placement may pick
    # the other one)
    for p in later:
        assert p["decode_prefix_tokens"] == (192 if p["decode_node"] == first["decode_node"] else 0)
    assert r.usage.prompt_tokens == 200 and r.usage.completion_tokens == 15


def test_a_list_of_prompts_with_n_and_echo(url, offline):
    prompts = ["first prompt ", "the second one "]
    b = complete(url, prompts, n=2, echo=True, max_tokens=4).json()
    assert [c["index"] for c in b["choices"]] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        (want,) = offline.generate([p], SamplingParams(temperature=0, max_tokens=4))
        for c in b["choices"][2 * i : 2 * i + 2]:
            assert c["text"] == p + want.text
    assert b["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert b["usage"]["completion_tokens"] == 16
    # streamed: the echo comes first, then each choice's tokens, by index
    r = httpx.post(
        url + "/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompts,
            "max_tokens": 4,
            "temperature": 0,
            "echo": True,
            "stream": True,
        },
        timeout=60,
    )
    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    texts = {0: "", 1: ""}
    for ev in events:
        for c in ev["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == {0: b["choices"][0]["text"], 1: b["choices"][2]["text"]}


def test_echo_with_logprobs_scores_the_prompt_on_a_prefill_node(url, offline):
    # the output's tokens, scored as prompt tokens by a prefill node, have the logprobs the
    # deployment generated them with; the first prompt token's is null (as vLLM)
    prompt = rand_prompt(29, 12)
    gen = complete(url, prompt, max_tokens=4, logprobs=2).json()
    out = gen["prfaas"]["token_ids"]
    want = gen["choices"][0]["logprobs"]["token_logprobs"]
    r = complete(url, prompt + out, max_tokens=0, echo=True, logprobs=2)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 4 and r.json()["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][-4:] == pytest.approx(want, abs=1e-3)
    assert ch["text"] == offline.engine.tokenizer.decode(prompt + out)


def test_penalties_bias_and_min_tokens_equal_the_offline_engines(url, offline):
    prompt = rand_prompt(23, 30)
    kw = {
        "repetition_penalty": 0.3,
        "frequency_penalty": 1.0,
        "presence_penalty": 0.5,
        "logit_bias": {"65": 2.0},
        "min_tokens": 3,
    }
    sp = SamplingParams(temperature=0, max_tokens=8, **{**kw, "logit_bias": {65: 2.0}})
    (want,) = offline.generate([prompt], sp)
    b = complete(url, prompt, **kw).json()
    assert b["prfaas"]["token_ids"] == want.token_ids


def test_tokenize_detokenize_version_models(url):
    t = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "héllo"}).json()
    assert t == {
        "count": 6,
        "max_model_len": 1024,
        "tokens": list("héllo".encode()),
        "token_strs": None,
    }
    msgs = [{"role": "user", "content": "hi"}]
    t = httpx.post(url + "/tokenize", json={"messages": msgs}).json()
    assert t["tokens"] == list(b"<|user|>\nhi\n<|assistant|>\n")
    d = httpx.post(url + "/detokenize", json={"tokens": list("héllo".encode())}).json()
    assert d == {"prompt": "héllo"}
    assert httpx.post(url + "/detokenize", json={"tokens": [99999]}).status_code == 400
    assert httpx.post(url + "/tokenize", json={"model": "x", "prompt": "a"}).status_code == 404
    from prfaas.server.gateway.model_routes import prfaas_version

    assert httpx.get(url + "/version").json() == {"version": prfaas_version()}
    (card,) = httpx.get(url + "/v1/models").json()["data"]
    assert card["max_model_len"] == 1024 and card["id"] == "tiny"


# ------------------------------------------------------------------------ faults (kill nodes last)


def test_link_cut_falls_back_to_pd_p(url):
    prfaas_url = node_info(url, "prfaas-0")["url"]
    auth = control_headers(CONFIG["secret"])
    r = httpx.post(prfaas_url + "/admin/link", json={"cluster": "pd", "up": False}, headers=auth)
    assert r.status_code == 200
    got = complete(url, rand_prompt(6, 400))  # long: would go to PrfaaS
    assert got.status_code == 200, got.text
    p = got.json()["prfaas"]
    assert p["prefill_cluster"] == "pd" and p["prefill_node"] == "pd-p0"
    assert p["transfer_bytes"] == KDA_BYTES + 399 * MLA_BYTES_PER_TOKEN
    wait_for(lambda: not node_info(url, "prfaas-0")["available"])
    assert complete(url, rand_prompt(7, 400)).json()["prfaas"]["prefill_cluster"] == "pd"
    # restored: long prompts go back to PrfaaS
    httpx.post(prfaas_url + "/admin/link", json={"cluster": "pd", "up": True}, headers=auth)
    wait_for(lambda: node_info(url, "prfaas-0")["available"])
    assert complete(url, rand_prompt(8, 400)).json()["prfaas"]["prefill_cluster"] == "prfaas"


def test_decode_node_dies_only_its_requests_fail(url):
    # ``a`` must still be decoding when ``b`` is placed (least-loaded: the other node) and when
    # its node is killed: it asks for as many tokens as the context holds, so that on a loaded
    # machine it is still running however long ``b``'s prefill and hand-off take; the kill ends it
    async def stream(
        c: httpx.AsyncClient, seed: int, started: asyncio.Event, out: dict, max_tokens: int
    ):
        body = {
            "model": "tiny",
            "prompt": rand_prompt(seed, 20),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with c.stream("POST", "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            out["node"] = r.headers["x-prfaas-decode-node"]
            out["events"] = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    out["events"].append(json.loads(line[6:]))
                    started.set()
                elif line == "data: [DONE]":
                    out["done"] = True

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            a, b = {}, {}
            ea, eb = asyncio.Event(), asyncio.Event()
            long = CONFIG["engine"]["max_model_len"] - 24
            ta = asyncio.create_task(stream(c, 11, ea, a, long))
            await ea.wait()
            tb = asyncio.create_task(stream(c, 12, eb, b, 150))
            await eb.wait()
            assert not ta.done(), "a finished before b started: nothing left to kill"
            assert a["node"] != b["node"]  # least-loaded decode placement
            victim = node_info(url, a["node"])
            a["victim_pid"] = victim["pid"]
            os.kill(victim["pid"], signal.SIGKILL)
            await asyncio.gather(ta, tb)
            return a, b

    a, b = asyncio.run(run())
    # the dead node's request ends with a clear error event, then [DONE]
    assert a["status"] == 200 and a.get("done")
    err = a["events"][-1]["error"]
    assert err["code"] == "decode_node_failed" and a["node"] in err["message"]
    # the other one is unaffected
    assert b["events"][-1]["choices"][0]["finish_reason"] == "length"
    assert b["events"][-1]["prfaas"]["token_ids"].__len__() == 150
    # new requests avoid the dead node (until `prfaas up` restarted it: then either will do)
    r = complete(url, rand_prompt(13, 30))
    assert r.status_code == 200
    assert r.json()["prfaas"]["decode_node"] == b["node"] or node_info(url, a["node"])[
        "pid"
    ] not in (
        None,
        a["victim_pid"],
    )
    # the supervisor restarts it; the router takes it back
    wait_for(lambda: node_info(url, a["node"])["up"], 120)
    assert node_info(url, a["node"])["pid"] != a["victim_pid"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_prfaas_node_down_falls_back_without_error(url):
    victim = node_info(url, "prfaas-0")
    os.kill(victim["pid"], signal.SIGKILL)
    r = complete(url, rand_prompt(9, 400))
    assert r.status_code == 200, r.text
    p = r.json()["prfaas"]
    assert p["prefill_cluster"] == "pd"
    wait_for(lambda: not node_info(url, "prfaas-0")["up"])
    r = complete(url, rand_prompt(10, 400))
    assert r.status_code == 200  # PD-P, or PrfaaS again once restarted
    assert r.json()["prfaas"]["prefill_cluster"] == "pd" or node_info(url, "prfaas-0")["up"]


def test_ctrl_c_stops_everything(deployment):
    proc: subprocess.Popen = deployment["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    log = Path(deployment["dir"], "up.log").read_text()
    assert "stopped." in log
    for n in deployment["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(n["pid"], 0)


def test_prfaas_up_smoke_exits_zero(tmp_path):
    """The README's set-up-and-run command: default deployment, a few requests, exit 0."""
    r = subprocess.run(
        [sys.executable, "-m", "prfaas.cli", "up", "--smoke", "--port", "0"]
        + ["--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "prefill pd/pd-p0" in out and "prefill prfaas/prfaas-0" in out
    assert (
        "decode-side prefix 992" in out
    )  # the shared-prefix request sent only its tail (62 blocks)
    assert "ends with [DONE]: True" in out and "stopped." in out


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all open at once: n distinct ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_components_started_one_by_one(tmp_path):
    """`prfaas node` per node and `prfaas router`, as on separate machines (fixed addresses)."""
    cfg = json.loads(json.dumps(CONFIG))
    cfg["clusters"][1]["nodes"] = cfg["clusters"][1]["nodes"][:2]
    ports = iter(_free_ports(4))
    for c in cfg["clusters"]:
        for n in c["nodes"]:
            n.update(host="127.0.0.1", http_port=next(ports))
            if n["role"] == "decode":
                n["kv_port"] = next(ports)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    names = ["prfaas-0", "pd-p0", "pd-d0"]
    procs = []
    try:
        for name in names + ["router"]:
            extra = ["--node", name] if name != "router" else ["--port", "0"]
            cmd = "router" if name == "router" else "node"
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "prfaas.cli", cmd, "--config", str(path)]
                    + extra
                    + ["--ready-file", str(tmp_path / f"{name}.json")],
                    stdout=(tmp_path / f"{name}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )

        def ready() -> bool:
            for p, n in zip(procs, names + ["router"], strict=True):
                assert p.poll() is None, (tmp_path / f"{n}.log").read_text()
            return all((tmp_path / f"{n}.json").exists() for n in names + ["router"])

        wait_for(ready, 90)
        gw = json.loads((tmp_path / "router.json").read_text())["url"]
        wait_for(lambda: httpx.get(gw + "/health").json()["status"] == "ok")
        long = complete(gw, rand_prompt(20, 300)).json()["prfaas"]
        short = complete(gw, rand_prompt(21, 30)).json()["prfaas"]
        assert (long["prefill_node"], short["prefill_node"]) == ("prfaas-0", "pd-p0")
        assert long["decode_node"] == short["decode_node"] == "pd-d0"
        # the gateway process served them without loading torch (it never builds an engine)
        maps = Path(f"/proc/{procs[-1].pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs]
    assert codes == [0, 0, 0, 0]
