"""Mooncake Store as the cluster's prefix-cache pool: the ``mooncake_master`` process of a cluster and
the store client a node uses (``KVStore`` for :class:`~prfaas.cache.store_tier.StoreTier`)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prfaas.cache.store_tier import StoreError

MIN_SEGMENT_MB = 16  # Mooncake refuses smaller segments
_CLOSING: list[object] = []  # clients being closed in the background (kept alive until exit)


@dataclass(frozen=True)
class PoolAddress:
    """Where a cluster's Mooncake Store is: master RPC ``host:port`` and the HTTP metadata URL."""

    master: str
    metadata: str

    def __post_init__(self) -> None:
        host, _, port = self.master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"pool master address must be host:port, got {self.master!r}")
        if not self.metadata.startswith("http://"):
            raise ValueError(f"pool metadata must be an http:// URL, got {self.metadata!r}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MooncakeMaster:
    """One ``mooncake_master`` bound to ``host`` on free ports (``start()`` / ``stop()``)."""

    def __init__(self, host: str = "127.0.0.1", log_file: str | Path | None = None) -> None:
        self.host = host
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None
        self.rpc_port = self.http_port = self.metrics_port = 0

    @property
    def address(self) -> PoolAddress:
        return PoolAddress(
            f"{self.host}:{self.rpc_port}", f"http://{self.host}:{self.http_port}/metadata"
        )

    def start(self, timeout_s: float = 20.0) -> MooncakeMaster:
        exe = shutil.which("mooncake_master")
        if exe is None:
            raise RuntimeError(
                "mooncake_master not found: pip install mooncake-transfer-engine-non-cuda"
            )
        self.rpc_port, self.http_port, self.metrics_port = (free_port(self.host) for _ in range(3))
        cmd = [
            exe,
            f"--rpc_port={self.rpc_port}",
            f"--rpc_address={self.host}",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_port={self.http_port}",
            f"--http_metadata_server_host={self.host}",
            f"--metrics_host={self.host}",
            f"--metrics_port={self.metrics_port}",
        ]
        out = open(self.log_file, "wb") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if self.log_file:
                out.close()
        deadline = time.monotonic() + timeout_s
        for port in (self.rpc_port, self.http_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mooncake_master exited with {self.proc.returncode}")
                with contextlib.suppress(OSError), socket.create_connection((self.host, port), 0.2):
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mooncake_master not listening on {port} in {timeout_s} s")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> MooncakeMaster:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MooncakeKVStore:
    """A Mooncake Store client: ``put``/``get`` of bytes; StoreError when the store fails."""

    def __init__(
        self,
        address: PoolAddress,
        host: str = "127.0.0.1",
        segment_mb: int = 64,
        buffer_mb: int = 16,
    ) -> None:
        if segment_mb < MIN_SEGMENT_MB or buffer_mb < 1:
            raise ValueError(
                f"segment_mb must be >= {MIN_SEGMENT_MB} (Mooncake's minimum) and buffer_mb >= 1"
            )
        from mooncake.store import MooncakeDistributedStore

        self.address = address
        self.store = MooncakeDistributedStore()
        for attempt in range(3):  # a transient metadata-server hiccup fails setup with -1
            rc = self.store.setup(
                host, address.metadata, segment_mb << 20, buffer_mb << 20, "tcp", "", address.master
            )
            if rc == 0 or rc == -600:  # -600: segment refused, retrying does not help
                break
            time.sleep(0.5 * (attempt + 1))
        if rc != 0:
            raise StoreError(f"Mooncake Store setup against {address.master} failed ({rc})")

    def put(self, key: str, data: bytes) -> None:
        rc = self.store.put(key, data)
        if rc != 0:
            raise StoreError(f"put {key}: error {rc}")

    def get(self, key: str) -> bytes | None:
        ex = self.store.is_exist(key)
        if ex < 0:
            raise StoreError(f"is_exist {key}: error {ex}")
        if ex == 0:
            return None
        data = self.store.get(key)
        return bytes(data) if data else None  # removed meanwhile: a miss

    def exists(self, key: str) -> bool:
        ex = self.store.is_exist(key)
        if ex < 0:
            raise StoreError(f"is_exist {key}: error {ex}")
        return ex == 1

    def close(self, wait: bool = True) -> None:
        """Unmount from the pool (about 2 s; 5 s or more once the master is gone: ``wait=False``
        does it in a daemon thread)."""

        def run(store: object) -> None:
            with contextlib.suppress(Exception):
                store.close()

        if wait:
            run(self.store)
        else:
            _CLOSING.append(self.store)
            threading.Thread(target=run, args=(self.store,), daemon=True).start()
