"""The gateway's OpenAI API over one in-process engine (``prfaas serve``'s ``LocalBackend``, tiny
on CPU, greedy): ``echo`` with ``logprobs`` (the prompt's tokens with their log-probabilities,
the first null, equal to the ones the engine reports when it generates those tokens), ``echo``
with ``max_tokens`` 0, stop strings only after ``min_tokens``, ``response_format``."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from prfaas import EngineConfig, LLMEngine
from prfaas.server.gateway.api import build_gateway_app
from prfaas.server.local import LocalBackend
from prfaas.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def client():
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_seqs=4))
    with TestClient(build_gateway_app(LocalBackend(engine, "tiny"))) as c:
        yield c


@pytest.fixture(scope="module")
def tok():
    from prfaas.model.config import resolve_config

    return load_tokenizer("tiny", resolve_config("tiny").eos_token_id)


def complete(client: TestClient, **kw) -> dict:
    body = {"model": "tiny", "temperature": 0, "ignore_eos": True, **kw}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_logprobs_scores_the_prompt_like_the_generation(client, tok):
    prompt = tok.encode("The quick brown fox")
    gen = complete(client, prompt=prompt, max_tokens=4, logprobs=2)
    out = gen["prfaas"]["token_ids"]
    want = gen["choices"][0]["logprobs"]["token_logprobs"]
    assert len(out) == len(want) == 4
    # the prompt and the output, echoed and scored, nothing generated (max_tokens 0)
    ids = prompt + out
    r = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    ch = r["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == tok.decode(ids) and ch["finish_reason"] == "length"
    assert r["usage"] == {**r["usage"], "prompt_tokens": len(ids), "completion_tokens": 0}
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(t) >= 1 for t in lp["top_logprobs"][1:])  # top 2 (texts may coincide)
    # the output's tokens, scored as prompt tokens, have the logprobs they were generated with
    assert lp["token_logprobs"][-4:] == pytest.approx(want, abs=1e-3)
    offs = lp["text_offset"]
    assert offs[0] == 0 and all(
        b - a == len(t) for a, b, t in zip(offs[:-1], offs[1:], lp["tokens"][:-1], strict=True)
    )
    # echo with logprobs and generation: the prompt's entries, then the output's
    r = complete(client, prompt=prompt, max_tokens=4, echo=True, logprobs=2)
    lp2 = r["choices"][0]["logprobs"]
    assert len(lp2["tokens"]) == len(prompt) + 4 and lp2["token_logprobs"][0] is None
    assert lp2["token_logprobs"][1 : len(prompt)] == pytest.approx(
        lp["token_logprobs"][1 : len(prompt)], abs=1e-5
    )
    assert lp2["token_logprobs"][len(prompt) :] == pytest.approx(want, abs=1e-5)
    assert r["choices"][0]["text"] == tok.decode(prompt) + gen["choices"][0]["text"]


def test_echo_with_logprobs_streamed(client, tok):
    prompt = "Hello"
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
        "stream": True,
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == prompt
    assert first["logprobs"]["tokens"] == [tok.decode([t]) for t in tok.encode(prompt)]
    assert first["logprobs"]["token_logprobs"][0] is None
    rest = [c["choices"][0] for c in chunks[1:]]
    assert sum(len(c["logprobs"]["tokens"]) for c in rest) == 3
    assert rest[-1]["finish_reason"] in ("length", "stop")


def test_stop_strings_wait_for_min_tokens(client, tok):
    full = complete(client, prompt="abc", max_tokens=12)
    ids = full["prfaas"]["token_ids"]
    text = tok.decode(ids)
    # a stop string: an ASCII character the output has within its first tokens
    k = next((i for i in range(1, 6) if 32 < ids[i] < 127), None)
    if k is None:
        pytest.skip("no ASCII token early in this output")
    stop = chr(ids[k])
    first = text.find(stop)
    r = complete(client, prompt="abc", max_tokens=12, stop=[stop])
    assert r["choices"][0]["text"] == text[:first] and r["choices"][0]["finish_reason"] == "stop"
    m = k + 1  # the stop string must end after the first m tokens' text
    floor = len(tok.decode(ids[:m]))
    later = text.find(stop, floor)
    r = complete(client, prompt="abc", max_tokens=12, stop=[stop], min_tokens=m)
    want = text[:later] if later >= 0 else text
    assert r["choices"][0]["text"] == want


def test_response_format(client):
    msgs = [{"role": "user", "content": "hi"}]
    for path, base in [
        ("/v1/chat/completions", {"messages": msgs}),
        ("/v1/completions", {"prompt": "hi"}),
    ]:
        body = {"model": "tiny", "max_tokens": 2, **base}
        ok = client.post(path, json={**body, "response_format": {"type": "text"}})
        assert ok.status_code == 200, ok.text
        for kind in ("json_object", "json_schema"):
            r = client.post(path, json={**body, "response_format": {"type": kind}})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "response_format"
            assert kind in err["message"] and "structured output" in err["message"]
