"""Where the shards of a synthetic checkpoint go: ``--dirs`` entries (``PATH``, ``PATH=GB`` capped,
``tmpfs:PATH`` a tmpfs mounted there, root only), first fit within free space and host memory
(memory-backed entries together keep a reserve free), then the directories made and mounted,
and at the end everything written, made and mounted removed again. Sizes in bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from benchmarks.host_memory import GB, GIB, MEMORY_FS, cgroup_memory_limit, fs_space, meminfo

Log = Callable[[str, str], None]  # (phase, message)


class PlanError(RuntimeError):
    """The run cannot go ahead (space, memory, time): the message says why."""


class MountFailed(PlanError):
    """A ``tmpfs:PATH`` entry could not be mounted (the plan goes on without it)."""

    def __init__(self, target: Target, why: str) -> None:
        super().__init__(why)
        self.target = target


@dataclasses.dataclass
class Target:
    """One ``--dirs`` entry: where shards may go."""

    path: Path
    cap: int | None = None  # the entry's own limit in bytes (PATH=GB)
    mount: bool = False  # tmpfs:PATH: mount a tmpfs there
    fs: dict = dataclasses.field(default_factory=dict)
    budget: int = 0  # bytes this run may place here
    placed: int = 0
    prepared: bool = False
    mounted: bool = False
    created: list[Path] = dataclasses.field(default_factory=list)  # directories we made

    @property
    def memory_backed(self) -> bool:
        return self.mount or self.fs.get("fstype") in MEMORY_FS


def parse_target(s: str) -> Target:
    mount = s.startswith("tmpfs:")
    if mount:
        s = s[len("tmpfs:") :]
    cap = None
    if "=" in s:
        s, gb = s.rsplit("=", 1)
        cap = int(float(gb) * GB)
    return Target(Path(s).absolute(), cap, mount)


def place(
    shards: list[dict],
    targets: list[Target],
    host_mem: int,
    mem_reserve: int,
    disk_reserve: int,
) -> None:
    """Give each shard a ``target`` (first fit in ``--dirs`` order) within each target's free
    space less ``disk_reserve`` (entries on one filesystem share it), its cap, and, for
    memory-backed ones together, ``host_mem - mem_reserve`` less the tmpfs memory already in
    use. Raises PlanError, saying what is missing, if the shards do not fit."""
    shmem_now = meminfo().get("Shmem", 0)
    mem_left = host_mem - mem_reserve - shmem_now
    fs_left: dict[int, int] = {}
    for t in targets:
        t.fs = fs_space(t.path)
        if t.mount:
            free = mem_left
        else:
            free = fs_left.setdefault(t.fs["dev"], t.fs["free"] - disk_reserve)
        t.budget = max(0, min(free, t.cap if t.cap is not None else free))
    for sh in shards:
        for t in targets:
            room = t.budget - t.placed
            if t.memory_backed:
                room = min(room, mem_left)
            if not t.mount:
                room = min(room, fs_left[t.fs["dev"]])
            if sh["nbytes"] <= room:
                sh["target"] = str(t.path)
                t.placed += sh["nbytes"]
                if t.memory_backed:
                    mem_left -= sh["nbytes"]
                if not t.mount:
                    fs_left[t.fs["dev"]] -= sh["nbytes"]
                break
        else:
            need = sum(s["nbytes"] for s in shards)
            have = sum(t.placed for t in targets)
            raise PlanError(
                f"the checkpoint ({need / GB:.1f} GB) does not fit: {sh['file']} "
                f"({sh['nbytes'] / GB:.2f} GB) finds no room after {have / GB:.1f} GB placed "
                f"(memory-backed room left {max(mem_left, 0) / GB:.1f} GB of host memory "
                f"{host_mem / GIB:.0f} GiB less a {mem_reserve / GIB:.0f} GiB reserve). Add "
                "--dirs entries (tmpfs:PATH mounts one, as root), raise --host-mem-gib if the "
                "machine has more memory than MemTotal says, or cut the model with --layers N"
            )


def print_space(targets: list[Target], host_mem: int, log: Log) -> None:
    mi = meminfo()
    log(
        "plan",
        f"memory: MemTotal {mi.get('MemTotal', 0) / GIB:.1f} GiB, MemAvailable "
        f"{mi.get('MemAvailable', 0) / GIB:.1f} GiB, Shmem {mi.get('Shmem', 0) / GIB:.1f} GiB, "
        f"cgroup limit {cgroup_memory_limit()}, assumed host memory {host_mem / GIB:.0f} GiB",
    )
    for t in targets:
        f = fs_space(t.path)
        log(
            "plan",
            f"df {t.path}{' (tmpfs to mount)' if t.mount else ''}: {f['fstype']} on "
            f"{f['mount']}, size {f['total'] / GB:.1f} GB, free {f['free'] / GB:.1f} GB"
            + (f", cap {t.cap / GB:.1f} GB" if t.cap is not None else ""),
        )


def prepare_targets(targets: list[Target], log: Log) -> None:
    """Create the used directories (recording which) and mount the tmpfs entries that got
    shards; an existing non-empty directory is refused (its files are not ours to delete)."""
    for t in targets:
        if not t.placed or t.prepared:
            continue
        if t.path.exists() and any(t.path.iterdir()):
            raise PlanError(f"{t.path} exists and is not empty: remove it or choose another path")
        missing = []
        p = t.path
        while not p.exists():
            missing.append(p)
            p = p.parent
        if t.mount and os.geteuid() != 0:
            raise MountFailed(t, f"tmpfs:{t.path} needs root to mount a tmpfs")
        t.path.mkdir(parents=True, exist_ok=True)
        t.created += list(reversed(missing))
        t.prepared = True
        if t.mount:
            size = t.placed + GIB
            try:
                r = subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(t.path)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise MountFailed(t, f"mount tmpfs at {t.path} failed: {e}") from None
            if r.returncode != 0:
                raise MountFailed(t, f"mount tmpfs at {t.path} failed: {r.stderr.strip()}")
            t.mounted = True
            log("plan", f"mounted a tmpfs of {size / GB:.1f} GB at {t.path}")


def cleanup(targets: list[Target], ck_dir: Path | None, shards: list[dict], log: Log) -> dict:
    """Delete what this run wrote: shards, the checkpoint directory's files, directories it
    made, tmpfs it mounted. Returns what was removed."""
    files, nbytes = 0, 0
    for sh in shards:
        if "target" not in sh:
            continue
        p = Path(sh["target"]) / sh["file"]
        with contextlib.suppress(FileNotFoundError):
            nbytes += p.stat().st_size
            p.unlink()
            files += 1
    if ck_dir is not None and ck_dir.exists():
        for p in ck_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                files += 1
        with contextlib.suppress(OSError):
            ck_dir.rmdir()
    for t in targets:
        if t.mounted:
            r = subprocess.run(["umount", str(t.path)], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                log("cleanup", f"umount {t.path} failed: {r.stderr.strip()}")
            else:
                t.mounted = False
    for d in reversed([d for t in targets for d in t.created]):  # deepest (latest made) first
        with contextlib.suppress(OSError):
            d.rmdir()
    return {"files_deleted": files, "shard_bytes_deleted": nbytes}
