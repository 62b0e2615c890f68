"""Start a whole `prfaas up` deployment as a subprocess for a test module (loopback only) and
wait, bounded, for its ready file; stop it with Ctrl-C on exit. Shared by the server tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


@contextmanager
def running_deployment(
    config: dict[str, Any],
    d: Path,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[dict[str, Any]]:
    """Yield the ready file's contents plus ``proc`` and ``dir``."""
    cfg = d / "deploy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    ready = d / "gateway.json"
    with open(d / "up.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prfaas.cli", "up", "--config", str(cfg), "--port", "0"]
            + ["--ready-file", str(ready), "--log-dir", str(d / "logs")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready.exists():
            assert proc.poll() is None, (d / "up.log").read_text()
            assert time.monotonic() < deadline, "deployment did not start"
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        info["proc"], info["dir"] = proc, d
        yield info
    finally:
        if proc.poll() is None:  # Ctrl-C stops everything cleanly
            proc.send_signal(signal.SIGINT)
            proc.wait(stop_timeout_s)
