"""What a benchmark reads about the host's memory and filesystems: /proc/meminfo, the cgroup
limit, the mount and ``df`` of a path, and a thread sampling this process's /proc/self/status
(VmRSS, RssAnon, RssFile, RssShmem, VmHWM) for their peaks. Sizes in bytes."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

GB = 1e9
GIB = 1 << 30
MEMORY_FS = ("tmpfs", "ramfs", "devtmpfs")  # filesystems whose files live in host memory
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, Shmem, ...)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            parts = v.split()
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def cgroup_memory_limit() -> int | None:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            v = Path(p).read_text().strip()
            if v != "max" and int(v) < 1 << 60:
                return int(v)
    return None


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding ``path`` (its nearest existing ancestor)."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    best, fstype = "/", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            f = line.split()
            if len(f) < 3:
                continue
            mnt = f[1].replace("\\040", " ")
            if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best
            ):
                best, fstype = mnt, f[2]
    return best, fstype


def fs_space(path: Path) -> dict:
    """``df`` of ``path`` (its nearest existing ancestor): bytes total / free, mount, type."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    mnt, fstype = mount_of(p)
    return {
        "path": str(path),
        "mount": mnt,
        "fstype": fstype,
        "total": st.f_blocks * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
        "dev": os.stat(p).st_dev,
    }


def read_status() -> dict[str, int]:
    """The ``STATUS_KEYS`` of /proc/self/status, in bytes (0 where absent)."""
    out = dict.fromkeys(STATUS_KEYS, 0)
    with open("/proc/self/status") as fh:
        for line in fh:
            k = line.split(":", 1)[0]
            if k in out:
                out[k] = int(line.split()[1]) * 1024
    return out


class StatusSampler:
    """A thread that reads /proc/self/status every ``interval_s`` and keeps each key's peak.
    ``peaks()`` includes a fresh reading, so an allocation still held is never missed; VmHWM is
    the kernel's own peak of VmRSS (nothing between samples escapes it)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples = 0
        self._peak = read_status()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)

    def _take(self) -> dict[str, int]:
        s = read_status()
        with self._lock:
            self.samples += 1
            for k, v in s.items():
                self._peak[k] = max(self._peak[k], v)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> StatusSampler:
        self._thread.start()
        return self

    def reset(self) -> dict[str, int]:
        """Start the peaks afresh from now; returns the current reading (the baseline)."""
        s = read_status()
        with self._lock:
            self._peak = dict(s)
        return s

    def peaks(self) -> dict[str, int]:
        self._take()
        with self._lock:
            return dict(self._peak)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def reset_hwm() -> bool:
    """VmHWM := VmRSS (``/proc/self/clear_refs`` 5); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
