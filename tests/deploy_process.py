"""Start a whole `prfaas up` deployment as a subprocess for a test module (loopback only) and
wait, bounded, for its ready file; stop it with Ctrl-C on exit. Shared by the server tests; the
benchmarks use the same helper (``prfaas.server.launcher.up_in_subprocess``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prfaas.server.launcher import up_in_subprocess


@contextmanager
def running_deployment(
    config: dict[str, Any],
    d: Path,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[dict[str, Any]]:
    """Yield the ready file's contents plus ``proc`` and ``dir``."""
    with up_in_subprocess(config, d, env, start_timeout_s, stop_timeout_s) as info:
        yield info
