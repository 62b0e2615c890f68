"""Process plumbing shared by the node and gateway processes (no torch): listening sockets that
a child can inherit, SIGTERM as Ctrl-C, the parent watch, atomic ready files."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), inheritable."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def exit_with_parent(parent_pid: int) -> None:
    """SIGTERM this process once ``parent_pid`` is no longer its parent (checked every second)."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def install_sigterm_as_interrupt() -> None:
    """SIGTERM ends the process like Ctrl-C (uvicorn re-raises the signal after its shutdown)."""
    signal.signal(signal.SIGTERM, _interrupt)


def write_ready_file(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers never see a partial file)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def exit_now(rc: int) -> NoReturn:
    """Exit once everything is stopped, skipping the interpreter's teardown of torch's modules
    (0.5-1.5 s on a busy machine): the caller has joined its threads and closed its sockets; the
    logs and output are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
