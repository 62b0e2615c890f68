"""``prfaas up --model DIR`` serving a release-format directory written by the test (tiny random
Kimi Linear weights, a small tiktoken BPE, special tokens, a chat template, generation_config
stop tokens): chat prompts are the template's token ids, outputs equal the offline engine's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from kimi_files import write_release_dir

from prfaas.engine import EngineConfig, LLMEngine, SamplingParams
from prfaas.tokenizer import load_tokenizer
from prfaas.tokenizer.chat import load_chat_format

DEPLOY = {
    "model": "tiny",  # replaced by --model
    "device": "cpu",
    "secret": "test-secret-0123456789abcdef",
    "transfer_backend": "tcp",
    "engine": {"max_num_seqs": 4, "max_model_len": 256, "checkpoint_interval": 64},
    "clusters": [
        {
            "name": "pd",
            "kind": "pd",
            "nodes": [{"name": "pd-p0", "role": "prefill"}, {"name": "pd-d0", "role": "decode"}],
        }
    ],
    "router": {"policy": "homogeneous", "poll_interval_s": 0.2, "prefill_timeout_s": 60.0},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    d = root / "kimi-tiny"
    d.mkdir()
    info = write_release_dir(d, seed=1)
    cfg = root / "deploy.yaml"
    cfg.write_text(yaml.safe_dump(DEPLOY))
    ready = root / "gateway.json"
    with open(root / "up.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prfaas.cli", "up", "--config", str(cfg), "--model", str(d)]
            + ["--port", "0", "--ready-file", str(ready), "--log-dir", str(root / "logs")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, (root / "up.log").read_text()
            assert time.monotonic() < deadline, "deployment did not start"
            time.sleep(0.2)
        url = json.loads(ready.read_text())["url"]
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=30).json()["status"] != "ok":
            assert time.monotonic() < deadline, "nodes did not come up"
            time.sleep(0.2)
        yield url, d, info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


def _offline(d, prompt_ids: list[int], max_tokens: int) -> list[int]:
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="float32", max_model_len=256))
    rid = eng.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    for _ in range(200):
        for o in eng.step():
            if o.request_id == rid and o.finished:
                return o.token_ids
    raise AssertionError("offline request did not finish")


def test_chat_uses_the_directorys_template_and_tokenizer(served):
    url, d, info = served
    tok = load_tokenizer(str(d))
    chat = load_chat_format(str(d), tok)
    msgs = [{"role": "user", "content": "Hello <|im_end|> world 中文"}]
    prompt_ids = chat.encode(msgs)
    assert prompt_ids.count(info["specials"]["<|im_end|>"]) == 2  # system's and user's end only
    body = {"model": str(d), "messages": msgs, "max_tokens": 6, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)
    want = _offline(d, prompt_ids, 6)
    ids = out["prfaas"]["token_ids"]
    assert ids == want
    assert out["choices"][0]["message"]["content"] == tok.decode(
        [i for i in want if i not in tok.stop_token_ids]
    )


def test_completion_text_is_kimi_tokenized(served):
    url, d, info = served
    tok = load_tokenizer(str(d))
    text = "The quick brown fox, 中文 café"
    body = {"model": str(d), "prompt": text, "max_tokens": 5, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(text))
    assert r.json()["prfaas"]["token_ids"] == _offline(d, tok.encode(text), 5)
    bad = {"model": str(d), "messages": [{"role": "tool", "content": "x"}], "max_tokens": 2}
    r = httpx.post(url + "/v1/chat/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "unknown role tool" in r.json()["error"]["message"]
