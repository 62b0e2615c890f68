"""``prfaas serve MODEL``: started as a user starts it (its own process, loopback), one request
through the official ``openai`` client equal to the offline engine's, the API key, Ctrl-C without a
traceback; bad arguments refused with one line and exit status 2 before anything loads."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from prfaas import LLM, SamplingParams


def prfaas(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prfaas.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_serve_one_request_through_the_openai_client_then_ctrl_c(tmp_path):
    ready = tmp_path / "ready.json"
    proc = prfaas(
        "serve",
        "tiny",
        "--port",
        "0",
        "--api-key",
        "sk-test",
        "--served-model-name",
        "my-tiny",
        "--max-model-len",
        "512",
        "--device",
        "cpu",
        "--ready-file",
        str(ready),
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        r = client.completions.create(
            model="my-tiny", prompt="Hello, serve", max_tokens=8, temperature=0
        )
        (want,) = LLM("tiny").generate(
            ["Hello, serve"], SamplingParams(temperature=0, max_tokens=8)
        )
        assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
        models = client.models.list().data
        assert [m.id for m in models] == ["my-tiny"] and models[0].max_model_len == 512
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 200  # open, as in vLLM
        assert "vllm:kv_cache_usage_perc" in httpx.get(url + "/metrics").text
    finally:
        err = interrupt(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "args, words",
    [
        (["nosuchmodel"], "unknown model"),
        (["tiny", "--port", "70000"], "port must be in"),
        (["tiny", "--device", "tpu"], "device must be"),
        (["tiny", "--gpu-memory-utilization", "1.5"], "(0, 1]"),
        (["tiny", "--tensor-parallel-size", "4"], "does not divide kda_num_heads 2"),
        (["tiny", "--max-model-len", "0"], "positive integer"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, words):
    proc = prfaas("serve", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("prfaas serve: error:")


def test_busy_port_is_refused_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = prfaas("serve", "tiny", "--port", str(port))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.count("\n") == 1 and f"127.0.0.1:{port}" in err, err


def interrupt(proc: subprocess.Popen, times: int = 1) -> str:
    """Ctrl-C ``proc`` (``times`` presses, 20 ms apart, while it runs); its stderr once it ended
    (killed, and the test fails, if it has not within 60 s)."""
    for i in range(times):
        if i:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def wait_ready(proc: subprocess.Popen, ready, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.1)
    return json.loads(ready.read_text())["url"]


def test_ctrl_c_ends_a_running_stream_at_once(tmp_path):
    # a stream of thousands of tokens is running: Ctrl-C does not wait for it; the client gets
    # OpenAI's error event (server_shutdown) and [DONE], the server exits cleanly
    ready = tmp_path / "ready.json"
    proc = prfaas("serve", "tiny", "--port", "0", "--device", "cpu", "--ready-file", str(ready))
    lines: list[str] = []
    started = threading.Event()

    def stream(url: str) -> None:
        body = {
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for ln in r.iter_lines():
                if ln.startswith("data: "):
                    lines.append(ln[6:])
                    started.set()

    try:
        url = wait_ready(proc, ready)
        t = threading.Thread(target=stream, args=(url,), daemon=True)
        t.start()
        assert started.wait(120), "no token streamed"
    finally:
        err = interrupt(proc)
    t.join(60)
    assert not t.is_alive()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert last["error"]["code"] == "server_shutdown", last
    assert len(lines) - 2 < 4000  # chunks before the error: cut short, not run to its end


def test_ctrl_c_twice_stops_without_a_traceback(tmp_path):
    # an impatient user presses Ctrl-C twice: uvicorn stops at once and asyncio cancels the app's
    # lifespan task; that must not surface as a traceback
    ready = tmp_path / "ready.json"
    proc = prfaas("serve", "tiny", "--port", "0", "--device", "cpu", "--ready-file", str(ready))
    try:
        wait_ready(proc, ready)
    finally:
        err = interrupt(proc, times=2)
    assert "Traceback" not in err and "stopped" in err, err
