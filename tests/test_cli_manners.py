"""Command-line manners: every command's ``--help`` loads neither torch nor numpy (so it starts
at once); argument errors are one line on stderr with exit status 2, before any process starts;
``--version``; the parsers' defaults equal the values of the modules they stand in for."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prfaas.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "scipy", "matplotlib", "prfaas.engine.engine")


@pytest.mark.parametrize("cmd", [None, *sorted(COMMANDS)])
def test_help_loads_nothing_heavy(cmd):
    # each command's --help in a fresh interpreter: which modules it loaded (sys.modules)
    argv = [cmd, "--help"] if cmd else ["--help"]
    probe = f"""
import json, sys
from prfaas.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
print("PROBE" + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
    assert r.returncode == 0 and line, r.stderr
    assert json.loads(line[-1][5:]) == [], cmd


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prfaas.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("prfaas ")


@pytest.mark.parametrize(
    "args, words",
    [
        (["up", "--port", "99999"], "port must be in"),
        (["up", "--device", "gpu"], "device must be"),
        (["up", "--model", "no-such-model"], "no-such-model"),
        (["up", "--device", "cuda"], "CUDA is not available"),
        (["generate", "--device", "cuda:x"], "device must be"),
        (["generate", "--temperature", "-1"], "--temperature"),
        (["generate", "--model", "nope"], "unknown model"),
        (["profile", "--lengths", "8"], "at least 2 distinct lengths"),
        (["serve", "nope"], "unknown model"),
        (["router", "--port", "-1"], "port must be in"),
        (["bench"], "required"),
        (["sim", "--link-drop", "3:1:0.5"], "START < END"),
    ],
)
def test_argument_errors_are_one_line_exit_2(args, words):
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert words in lines[0] and lines[0].startswith(f"prfaas {args[0]}: error:")
    assert "starting" not in r.stdout  # no node was started


def test_up_on_a_busy_port_starts_nothing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("up", "--port", str(port))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot listen" in r.stderr
    assert "starting" not in r.stdout


def test_up_checks_its_port_and_the_secret_without_torch():
    # the gateway's port is checked before anything heavy loads, and the handshake module (the
    # secret's check) is torch-free: the frames live in prfaas.transfer.frames
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        probe = f"""
import json, sys
import prfaas.transfer.auth
from prfaas.cli import main
try:
    main(["up", "--port", "{s.getsockname()[1]}"])
except SystemExit as e:
    assert e.code == 2, e.code
print("PROBE" + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
        r = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
    assert r.returncode == 0 and line, r.stderr
    assert json.loads(line[-1][5:]) == []
    assert "cannot listen" in r.stderr


def test_parser_defaults_equal_the_modules_values():
    from prfaas.bench import cli as bench_cli
    from prfaas.bench.client import ENDPOINTS, IGNORE_EOS_MODES
    from prfaas.bench.prompts import DEFAULT_BLOCK_TOKENS
    from prfaas.bench.workload import SYNTHETIC_OUTPUT_LEN
    from prfaas.sim import cli as sim_cli
    from prfaas.sim.setups import DEFAULT_CONFIG, SYSTEMS

    assert tuple(ENDPOINTS) == bench_cli.ENDPOINT_NAMES
    assert bench_cli.IGNORE_EOS_MODES == IGNORE_EOS_MODES
    assert bench_cli.DEFAULT_BLOCK_TOKENS == DEFAULT_BLOCK_TOKENS
    assert bench_cli.SYNTHETIC_OUTPUT_LEN == SYNTHETIC_OUTPUT_LEN
    assert sim_cli.SYSTEMS == SYSTEMS and sim_cli.DEFAULT_CONFIG == DEFAULT_CONFIG


def test_sim_ctrl_c_writes_the_running_system_as_partial(tmp_path):
    # a workload far too long to finish: Ctrl-C once it runs writes the report with what the
    # system finished, marked partial; no traceback, exit status 130
    out = tmp_path / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prfaas.cli", "sim", "--systems", "prfaas"]
        + ["--requests", "2000000", "--no-progress", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # printed as the system starts
        assert line.startswith("prfaas sim: prfaas, 2000000 requests"), line
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err and "prfaas (partial)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["prfaas (partial)"]
    s = summary["prfaas (partial)"]
    assert s["partial"] is True and 0 <= s["completed"] < 2000000
    assert "prfaas (partial)" in (out / "report.md").read_text()
