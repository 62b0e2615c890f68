"""Peak host memory while a full-size checkpoint loads (issue 14 point 2), on the machine it runs on.

One command, three processes:

1. **plan** (this process, no GPU): the tensors of ``--model`` (default the whole
   ``kimi-linear-48b`` geometry: 20,493 tensors, 49.1e9 parameters, 98.2 GB) under the release's
   names and dtypes (bf16; the router gate, its score-correction bias, ``A_log`` and ``dt_bias``
   fp32, the parameters prfaas keeps fp32), experts as separate tensors, cut into shards of
   ``--shard-gb`` (5 GB, as the release). ``df`` and the memory of every ``--dirs`` entry are
   printed, then each shard is placed in the first entry it fits in; the plan fails at once,
   before writing a byte, if they cannot hold the checkpoint. An entry ``tmpfs:PATH`` mounts a
   tmpfs there (root only) sized to what the entries before it left over; ``PATH=GB`` caps an
   entry. Memory-backed entries (tmpfs, ramfs) together keep ``--mem-reserve-gib`` of
   ``--host-mem-gib`` free.
2. **write** (a subprocess): builds the model on ``--device`` with random weights (drawn there),
   writes each shard (GPU -> two pinned buffers -> ``write``, ``--write-jobs`` shards at a time),
   symlinks every shard into the checkpoint directory with ``config.json`` (the release's fields)
   and ``model.safetensors.index.json``; disk shards are flushed and dropped from the page cache
   (``--warm`` keeps them cached). Then the reference, from the same tensors: a digest of every
   tensor's bytes, the logits of a fixed prompt (computed twice: are they deterministic?) and
   ``--gen-tokens`` greedy tokens (cache-free ``forward``).
3. **load** (a fresh subprocess): ``build_model(checkpoint, device, bfloat16)`` (the streaming
   loader) while a thread reads ``/proc/self/status`` every ``--sample-ms`` (VmRSS, RssAnon,
   RssFile, RssShmem; VmHWM reset before the load). Then the loaded tensors' digests against
   the writer's, the prompt's logits (bit-equal when the writer's two runs were) and greedy
   tokens.

Writes ``--out/load_peak_<tag>.{json,md}`` (machine, command, figures, verdict) and deletes every
file it wrote (and a tmpfs it mounted) at the end, failure or not. Every phase prints progress
with timings; a phase that outruns ``--budget-s`` (whole run) fails with the reason, as does a
writer whose measured rate says it cannot finish in time.

    # the H200 (128 GiB RAM, 64 GiB disk): about 3-5 minutes
    python3 benchmarks/load_peak.py --dirs /dev/shm/loadpeak tmpfs:/mnt/loadpeak /tmp/loadpeak \
        --host-mem-gib 128 --tag h200
    # CPU dry run (what the test runs)
    python3 benchmarks/load_peak.py --model tiny --device cpu --dirs /tmp/x --shard-gb 0.001 \
        --out /tmp/x-results --tag cpu

Exit status: 0 when the load matched the reference, 1 on a mismatch, 2 on any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prfaas

GB = 1e9
GIB = 1 << 30
MEMORY_FS = ("tmpfs", "ramfs")
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
_T0 = [time.time()]  # the run's start (subprocesses take the orchestrator's)


def log(phase: str, msg: str) -> None:
    print(f"[{time.time() - _T0[0]:7.1f}s {phase}] {msg}", flush=True)


class PlanError(RuntimeError):
    """The run cannot go ahead (space, memory, time): the message says why."""


class MountFailed(PlanError):
    """A ``tmpfs:PATH`` entry could not be mounted (the plan goes on without it)."""

    def __init__(self, target: Target, why: str) -> None:
        super().__init__(why)
        self.target = target


# ----- host facts -----------------------------------------------------------------------------
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


def machine() -> dict:
    from benchmarks.machine import cpu_model

    mi = meminfo()
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_total_gib": round(mi.get("MemTotal", 0) / GIB, 1),
        "cgroup_memory_limit_gib": (lambda v: round(v / GIB, 1) if v else None)(
            cgroup_memory_limit()
        ),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# ----- the checkpoint's tensors, shards and placement -------------------------------------------
def model_config(name: str, layers: int | None):
    """The preset's ModelConfig, cut to its first ``layers`` layers if given (a fallback where the
    whole geometry does not fit; the report says so)."""
    from prfaas.model.config import resolve_config

    cfg = resolve_config(name)
    if layers and layers < cfg.num_hidden_layers:
        full = tuple(i for i in cfg.full_attn_layers if i < layers)
        cfg = dataclasses.replace(
            cfg, num_hidden_layers=layers, full_attn_layers=full, name=f"{cfg.name}-{layers}l"
        )
    return cfg


def release_config(cfg) -> dict:
    """config.json with the fields of the released Kimi-Linear-48B-A3B config (their spelling:
    ``model_max_length``, ``first_k_dense_replace`` + ``moe_layer_freq``, the auto_map, ...),
    for ``cfg``'s geometry; prfaas reads it back to ``cfg``."""
    from prfaas.model.config import ModelConfig

    d = cfg.to_hf_dict()
    for k in ("mlp_layer_types", "max_position_embeddings", "rope_theta"):
        d.pop(k, None)
    d.update(
        {
            "auto_map": {
                "AutoConfig": "configuration_kimi.KimiLinearConfig",
                "AutoModel": "modeling_kimi.KimiLinearModel",
                "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
            },
            "head_dim": 72,
            "initializer_range": 0.02,
            "model_max_length": cfg.max_position_embeddings,
            "moe_layer_freq": 1,
            "num_key_value_heads": cfg.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "pad_token_id": cfg.vocab_size - 1,
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
    )
    back = ModelConfig.from_hf_dict(d)
    if back.fingerprint() != cfg.fingerprint():
        raise AssertionError("release config.json does not read back to the model's geometry")
    return dict(sorted(d.items()))


def tensor_specs(cfg) -> list[dict]:
    """The checkpoint's tensors in release order: name, shape, safetensors dtype, bytes."""
    import torch

    from prfaas.model.checkpoint import keeps_fp32
    from prfaas.model.model import HybridForCausalLM

    with torch.device("meta"):
        sd = HybridForCausalLM(cfg).state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out = []
    for k, v in sd.items():
        dt, size = ("F32", 4) if keeps_fp32(k) else ("BF16", 2)
        out.append({"name": k, "shape": list(v.shape), "dtype": dt, "nbytes": v.numel() * size})
    return out


def plan_shards(specs: list[dict], shard_bytes: int) -> list[dict]:
    """Consecutive tensors in shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[dict] = []
    for s in specs:
        if not shards or (
            shards[-1]["nbytes"] + s["nbytes"] > shard_bytes and shards[-1]["tensors"]
        ):
            shards.append({"tensors": [], "nbytes": 0})
        shards[-1]["tensors"].append(s["name"])
        shards[-1]["nbytes"] += s["nbytes"]
    n = len(shards)
    for i, sh in enumerate(shards):
        sh["file"] = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


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


def print_space(targets: list[Target], host_mem: int) -> None:
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


def prepare_targets(targets: list[Target]) -> None:
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
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(t.path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.returncode != 0:
                raise MountFailed(t, f"mount tmpfs at {t.path} failed: {r.stderr.strip()}")
            t.mounted = True
            log("plan", f"mounted a tmpfs of {size / GB:.1f} GB at {t.path}")


def cleanup(targets: list[Target], ck_dir: Path | None, shards: list[dict]) -> dict:
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


# ----- safetensors writing and digests (subprocesses) ----------------------------------------
def safetensors_header(entries: list[dict]) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header (padded to 8 bytes) of a file holding ``entries`` in
    order, and each entry's data offset."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for e in entries:
        meta[e["name"]] = {
            "dtype": e["dtype"],
            "shape": e["shape"],
            "data_offsets": [pos, pos + e["nbytes"]],
        }
        offsets.append(pos)
        pos += e["nbytes"]
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def write_all(fd: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    while mv.nbytes:
        n = os.write(fd, mv)
        mv = mv[n:]


def digests(tensors: dict, names: list[str]) -> dict[str, list[int]]:
    """Per tensor, two int64 sums over its bytes read as int32 (or uint8): plain, and each
    value times (its index mod 8191) + 1. Integer sums wrap identically in any order, so the
    CPU and a GPU agree; any changed byte changes the pair (a swap changes the second)."""
    import torch

    out, CH = {}, 1 << 24
    ws: dict = {}
    for k in names:
        t = tensors[k].detach().contiguous().reshape(-1).view(torch.uint8)
        x = t
        if t.numel() % 4 == 0:
            with contextlib.suppress(RuntimeError):  # a misaligned view stays bytes
                x = t.view(torch.int32)
        acc = torch.zeros(2, dtype=torch.int64, device=t.device)
        w = ws.get(t.device)
        if w is None:
            w = ws[t.device] = torch.arange(CH, device=t.device, dtype=torch.int64)
        for i in range(0, x.numel(), CH):
            c = x[i : i + CH].to(torch.int64)
            acc[0] += c.sum()
            acc[1] += (c * ((w[: c.numel()] + i) % 8191 + 1)).sum()
        out[k] = acc
    return {k: [int(a) for a in v.tolist()] for k, v in out.items()}


def prompt_ids(cfg, n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(1234)
    hi = min(cfg.vocab_size, cfg.bos_token_id or cfg.vocab_size)
    ids = torch.randint(0, hi, (n,), generator=g).tolist()
    return ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + ids[: n - 1]


def run_prompt(model, ids: list[int], gen: int, device) -> dict:
    """Logits of ``ids`` (cache-free forward, (T, vocab) float32 on the CPU) and ``gen`` greedy
    tokens after them; an error is returned, not raised (the weight digests still decide)."""
    import torch

    try:
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            logits = model(x)[0].float().cpu()
            toks = []
            for _ in range(gen):
                nxt = int(logits[-1].argmax()) if not toks else int(model(x)[0, -1].argmax())
                toks.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
        return {"logits": logits, "tokens": toks, "error": None}
    except Exception as e:  # noqa: BLE001 - reported, the digests still decide
        return {"logits": None, "tokens": None, "error": f"{type(e).__name__}: {e}"}


class Deadline:
    def __init__(self, at: float, what: str) -> None:
        self.at, self.what = at, what

    def left(self) -> float:
        return self.at - time.time()

    def check(self, done: int, total: int, started: float) -> None:
        now = time.time()
        rate = done / max(now - started, 1e-9)
        if now > self.at:
            raise TimeoutError(f"{self.what}: out of time after {done / GB:.1f} GB")
        if done > 0.1 * total and now - started > 20:
            need = (total - done) / max(rate, 1)
            if now + need > self.at + 30:
                raise TimeoutError(
                    f"{self.what}: at {rate / GB:.2f} GB/s the remaining "
                    f"{(total - done) / GB:.1f} GB need {need:.0f} s, {self.left():.0f} s left"
                )


def phase_write(state: dict) -> int:
    import torch

    from prfaas.model.checkpoint import build_model

    t0 = time.time()
    dev = torch.device(state["device"])
    cfg = model_config(state["model"], state["layers"])
    deadline = Deadline(state["write_deadline"], "writing the checkpoint")
    info: dict = {"torch": torch.__version__}
    if dev.type == "cuda":
        torch.cuda.init()
        info["gpu"] = torch.cuda.get_device_name(dev)
        free, total = torch.cuda.mem_get_info(dev)
        info["gpu_mem_gib"] = round(total / GIB, 1)
        log("write", f"{info['gpu']}: {free / GIB:.1f} of {total / GIB:.1f} GiB free")
        need = sum(sh["nbytes"] for sh in state["shards"])
        if need > free - 4 * GIB:
            raise PlanError(f"the model ({need / GB:.1f} GB) does not fit the GPU's free memory")
    model = build_model(cfg, device=dev, dtype=torch.bfloat16, seed=state["seed"])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    info["build_s"] = round(time.time() - t0, 2)
    log("write", f"model built on {dev} with random weights in {info['build_s']} s")
    sd = model.state_dict()
    specs = {s["name"]: s for s in state["specs"]}
    for k, s in specs.items():
        t = sd[k]
        dt = "F32" if t.dtype == torch.float32 else "BF16" if t.dtype == torch.bfloat16 else None
        if list(t.shape) != s["shape"] or dt != s["dtype"] or not t.is_contiguous():
            raise AssertionError(f"{k}: built {tuple(t.shape)} {t.dtype}, planned {s}")

    t1 = time.time()
    ref_digests = digests(sd, list(specs))
    info["digest_s"] = round(time.time() - t1, 2)
    log("write", f"digests of {len(specs)} tensors in {info['digest_s']} s")

    total = sum(sh["nbytes"] for sh in state["shards"])
    done = [0]
    lock = threading.Lock()
    tls = threading.local()
    chunk = state["chunk_bytes"]
    started = time.time()
    per_target: dict[str, dict] = {}
    stop = threading.Event()

    def write_shard(i: int, sh: dict) -> None:
        if stop.is_set():
            return
        ts = time.time()
        entries = [specs[k] for k in sh["tensors"]]
        head, _ = safetensors_header(entries)
        path = Path(sh["target"]) / sh["file"]
        memory_backed = sh["memory_backed"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, head)
            if dev.type == "cuda":
                if not hasattr(tls, "slots"):
                    tls.stream = torch.cuda.Stream(dev)
                    tls.slots = [
                        torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)
                    ]
                slots, pending = tls.slots, None
                cur, off = 0, 0

                def flush(cur: int, n: int, pending):
                    ev = torch.cuda.Event()
                    ev.record(tls.stream)
                    if pending is not None:
                        pending[2].synchronize()
                        write_all(fd, slots[pending[0]][: pending[1]].numpy())
                    return (cur, n, ev)

                with torch.cuda.stream(tls.stream):
                    for e in entries:
                        src = sd[e["name"]].reshape(-1).view(torch.uint8)
                        pos, n = 0, src.numel()
                        while pos < n:
                            take = min(n - pos, chunk - off)
                            slots[cur][off : off + take].copy_(
                                src[pos : pos + take], non_blocking=True
                            )
                            off, pos = off + take, pos + take
                            if off == chunk:
                                pending = flush(cur, off, pending)
                                cur, off = cur ^ 1, 0
                                with lock:
                                    done[0] += chunk
                                deadline.check(done[0], total, started)
                                if stop.is_set():
                                    raise TimeoutError("stopped")
                    if off:
                        pending = flush(cur, off, pending)
                    if pending is not None:
                        pending[2].synchronize()
                        write_all(fd, slots[pending[0]][: pending[1]].numpy())
                with lock:
                    done[0] += off
            else:
                for e in entries:
                    t = sd[e["name"]].detach().reshape(-1).view(torch.uint8)
                    write_all(fd, t.numpy())
                with lock:
                    done[0] += sh["nbytes"]
            if not memory_backed and state["cold"]:
                os.fsync(fd)
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        dt = time.time() - ts
        with lock:
            pt = per_target.setdefault(sh["target"], {"bytes": 0, "seconds": 0.0, "shards": 0})
            pt["bytes"] += sh["nbytes"]
            pt["seconds"] += dt
            pt["shards"] += 1
            d = done[0]
        el = time.time() - started
        log(
            "write",
            f"shard {i + 1}/{len(state['shards'])} {sh['nbytes'] / GB:.2f} GB -> {sh['target']} "
            f"in {dt:.1f} s ({sh['nbytes'] / GB / max(dt, 1e-9):.2f} GB/s); "
            f"{d / GB:.1f}/{total / GB:.1f} GB in {el:.1f} s ({d / GB / max(el, 1e-9):.2f} GB/s)",
        )

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(state["write_jobs"]) as pool:
        futs = [pool.submit(write_shard, i, sh) for i, sh in enumerate(state["shards"])]
        try:
            for f in futs:
                f.result()
        except BaseException:
            stop.set()
            raise
    info["write_s"] = round(time.time() - started, 2)
    info["write_gbps"] = round(total / GB / max(info["write_s"], 1e-9), 3)
    info["per_target"] = per_target
    log("write", f"{total / GB:.1f} GB written in {info['write_s']} s ({info['write_gbps']} GB/s)")

    ck = Path(state["ck_dir"])
    (ck / "config.json").write_text(json.dumps(release_config(cfg), indent=2))
    weight_map = {k: sh["file"] for sh in state["shards"] for k in sh["tensors"]}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for sh in state["shards"]:
        (ck / sh["file"]).symlink_to(Path(sh["target"]) / sh["file"])

    t2 = time.time()
    ids = prompt_ids(cfg, state["prompt_len"])
    a = run_prompt(model, ids, state["gen_tokens"], dev)
    b = run_prompt(model, ids, 0, dev)
    deterministic = (
        a["logits"] is not None
        and b["logits"] is not None
        and bool((a["logits"] == b["logits"]).all())
    )
    info["reference_s"] = round(time.time() - t2, 2)
    info["forward_error"] = a["error"]
    log(
        "write",
        f"reference: prompt of {len(ids)} tokens, greedy {a['tokens']}, logits deterministic "
        f"{deterministic}, {info['reference_s']} s"
        + (f"; error {a['error']}" if a["error"] else ""),
    )
    torch.save({"ids": ids, "logits": a["logits"], "tokens": a["tokens"]}, ck / "reference.pt")
    (ck / "reference.json").write_text(
        json.dumps({"digests": ref_digests, "deterministic": deterministic, "error": a["error"]})
    )
    Path(state["result"]).write_text(json.dumps(info))
    return 0


def corrupt(ck_dir: Path, name: str) -> None:
    """Flip the first byte of tensor ``name`` in its shard (tests: the check must catch it)."""
    index = json.loads((ck_dir / "model.safetensors.index.json").read_text())
    f = (ck_dir / index["weight_map"][name]).resolve()
    with open(f, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(n))
        pos = 8 + n + meta[name]["data_offsets"][0]
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x40]))


def phase_load(state: dict) -> int:
    sampler = StatusSampler(state["sample_ms"] / 1000).start()
    import torch

    from prfaas.model import checkpoint

    dev = torch.device(state["device"])
    if dev.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=dev)  # the CUDA context is part of the baseline, not of the load
    ck = Path(state["ck_dir"])
    time.sleep(2 * state["sample_ms"] / 1000)
    hwm_reset = reset_hwm()
    base = sampler.reset()
    log("load", "baseline " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in base.items()))
    t0 = time.perf_counter()
    model = checkpoint.build_model(str(ck), device=dev, dtype=torch.bfloat16)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    load_s = time.perf_counter() - t0
    peak = sampler.peaks()
    total = sum(sh["nbytes"] for sh in state["shards"])
    log(
        "load",
        f"{total / GB:.1f} GB loaded in {load_s:.1f} s ({total / GB / load_s:.2f} GB/s); peak "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in peak.items()),
    )
    ref = json.loads((ck / "reference.json").read_text())
    sd = model.state_dict()
    got = digests(sd, list(ref["digests"]))
    bad = sorted(k for k, v in ref["digests"].items() if got[k] != v)
    log("load", f"digests: {len(ref['digests']) - len(bad)}/{len(ref['digests'])} tensors equal")
    r = torch.load(ck / "reference.pt")
    out = run_prompt(model, r["ids"], len(r["tokens"] or []), dev)
    logits_equal = max_diff = None
    if out["logits"] is not None and r["logits"] is not None:
        logits_equal = bool(torch.equal(out["logits"], r["logits"]))
        max_diff = float((out["logits"] - r["logits"]).abs().max())
    tokens_equal = out["tokens"] == r["tokens"] if r["tokens"] is not None else None
    log(
        "load",
        f"prompt: logits bit-equal {logits_equal} (max |diff| {max_diff}), greedy "
        f"{out['tokens']} vs reference {r['tokens']}",
    )
    sampler.stop()
    ok = not bad and bool(tokens_equal) and (logits_equal or not ref["deterministic"])
    if out["error"] or ref["error"]:
        ok = not bad  # no forward to compare: the weights alone decide (reported)
    result = {
        "load_s": round(load_s, 3),
        "load_gbps": round(total / GB / load_s, 3),
        "baseline": base,
        "peak": peak,
        "peak_over_baseline": {k: peak[k] - base[k] for k in STATUS_KEYS},
        "hwm_reset": hwm_reset,
        "samples": sampler.samples,
        "digests_equal": len(ref["digests"]) - len(bad),
        "digests_total": len(ref["digests"]),
        "digest_mismatches": bad[:20],
        "logits_bit_equal": logits_equal,
        "logits_max_abs_diff": max_diff,
        "reference_deterministic": ref["deterministic"],
        "greedy_tokens": out["tokens"],
        "reference_tokens": r["tokens"],
        "tokens_equal": tokens_equal,
        "forward_error": out["error"] or ref["error"],
        # pinned staging of a GPU load (a CPU load reads in place)
        "staging_bytes": checkpoint.READ_DEPTH * checkpoint.CHUNK_BYTES
        if dev.type == "cuda"
        else 0,
        "match": ok,
    }
    Path(state["result"]).write_text(json.dumps(result))
    return 0 if ok else 1


# ----- the orchestrating process --------------------------------------------------------------
def run_phase(phase: str, state_path: Path, timeout: float) -> int:
    """Run ``phase`` in a fresh interpreter (output streamed), killed after ``timeout`` s."""
    if timeout < 5:
        raise PlanError(f"no time left for the {phase} phase")
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--phase", phase]
    cmd += ["--state", str(state_path)]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise PlanError(f"the {phase} phase ran past its {timeout:.0f} s and was killed") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def fmt_gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f} GiB"


def write_results(out_dir: Path, tag: str, res: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / f"load_peak_{tag}.json"
    j.write_text(json.dumps(res, indent=2) + "\n")
    m = out_dir / f"load_peak_{tag}.md"
    ld, wr, pl = res.get("load") or {}, res.get("write") or {}, res["plan"]
    mach = res["machine"]
    lines = [
        f"# Peak host memory while loading {pl.get('model')} ({pl.get('params', 0) / 1e9:.3g}B "
        f"parameters, {pl.get('bytes', 0) / GB:.3g} GB) on {tag}",
        "",
        f"Status: **{res['status']}**" + (f": {res['error']}" if res.get("error") else ""),
        "",
        f"Machine: {wr.get('gpu', res['device'])}, {mach['cpu']} ({mach['cores']} cores), "
        f"MemTotal {mach['mem_total_gib']} GiB, kernel {mach['kernel']}, torch "
        f"{wr.get('torch', '?')}. Command: `{res['command']}`",
        "",
        f"Checkpoint: {pl.get('tensors')} tensors in {pl.get('shards')} shards of <= "
        f"{pl.get('shard_gb')} GB (release names and config.json, bf16; router gate, bias, "
        f"A_log, dt_bias fp32); largest tensor {pl.get('largest_tensor')} "
        f"({pl.get('largest_tensor_bytes', 0) / GB:.3f} GB). Placed: "
        + "; ".join(
            f"{t['path']} ({t['fstype']}{', mounted here' if t['mount'] else ''}) "
            f"{t['placed'] / GB:.1f} GB"
            for t in pl.get("targets", [])
            if t["placed"]
        )
        + (" (disk shards flushed, page cache dropped)" if pl.get("cold") else ""),
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if wr:
        lines.append(
            f"| write (random weights on the device -> shards) | {wr.get('write_s')} s, "
            f"{wr.get('write_gbps')} GB/s |"
        )
    if ld:
        pk, base, over = ld["peak"], ld["baseline"], ld["peak_over_baseline"]
        lines += [
            f"| load (`build_model(dir, {res['device']}, bfloat16)`) | {ld['load_s']} s, "
            f"{ld['load_gbps']} GB/s |",
            f"| peak RssAnon during the load | {fmt_gib(pk['RssAnon'])} (baseline "
            f"{fmt_gib(base['RssAnon'])}, +{fmt_gib(over['RssAnon'])}) |",
            f"| peak VmRSS during the load | {fmt_gib(pk['VmRSS'])} (baseline "
            f"{fmt_gib(base['VmRSS'])}, +{fmt_gib(over['VmRSS'])}) |",
            f"| VmHWM (kernel peak, reset before the load: {ld['hwm_reset']}) | "
            f"{fmt_gib(pk['VmHWM'])} |",
            f"| peak RssFile / RssShmem | {fmt_gib(pk['RssFile'])} / {fmt_gib(pk['RssShmem'])} |",
            f"| loader's pinned staging buffers | {fmt_gib(ld['staging_bytes'])} |",
            f"| samples (every {res['sample_ms']} ms) | {ld['samples']} |",
            f"| tensors byte-equal to the writer's | {ld['digests_equal']}/{ld['digests_total']} |",
            f"| prompt logits bit-equal (writer's two runs equal: "
            f"{ld['reference_deterministic']}) | {ld['logits_bit_equal']} (max abs diff "
            f"{ld['logits_max_abs_diff']}) |",
            f"| greedy tokens equal | {ld['tokens_equal']} ({ld['greedy_tokens']}) |",
        ]
    lines += [f"| whole run | {res.get('total_s')} s |", ""]
    m.write_text("\n".join(lines))
    return j, m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="kimi-linear-48b")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to N layers")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dirs", nargs="+", default=["/dev/shm/loadpeak", "/tmp/loadpeak"])
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--host-mem-gib", type=float, default=None, help="default: MemTotal")
    ap.add_argument("--mem-reserve-gib", type=float, default=24.0)
    ap.add_argument("--disk-reserve-gib", type=float, default=2.0)
    ap.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time limit")
    ap.add_argument("--write-jobs", type=int, default=4)
    ap.add_argument("--chunk-mb", type=int, default=64, help="writer's pinned buffers")
    ap.add_argument("--sample-ms", type=float, default=50.0)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm", action="store_true", help="keep disk shards in the page cache")
    ap.add_argument("--keep", action="store_true", help="do not delete the checkpoint")
    ap.add_argument("--corrupt", default=None, help=argparse.SUPPRESS)  # tests
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default=None, help="results name: load_peak_<tag> (default: device)")
    ap.add_argument("--phase", choices=["write", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase:  # a subprocess
        state = json.loads(Path(args.state).read_text())
        _T0[0] = state["t0"]
        try:
            return {"write": phase_write, "load": phase_load}[args.phase](state)
        except Exception as e:
            log(args.phase, f"FAILED: {type(e).__name__}: {e}")
            Path(state["result"]).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            return 2

    started = _T0[0] = time.time()
    deadline = started + args.budget_s
    tag = args.tag or args.device.split(":")[0]
    mi = meminfo()
    host_mem = int(args.host_mem_gib * GIB) if args.host_mem_gib else mi.get("MemTotal", 0)
    targets = [parse_target(s) for s in args.dirs]
    res: dict = {
        "command": "python3 benchmarks/load_peak.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "sample_ms": args.sample_ms,
        "machine": machine(),
        "plan": {},
        "status": "failed",
    }
    shards: list[dict] = []
    ck_dir: Path | None = None
    work: Path | None = None
    rc = 2

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        cfg = model_config(args.model, args.layers)
        specs = tensor_specs(cfg)
        shards = plan_shards(specs, int(args.shard_gb * GB))
        total = sum(s["nbytes"] for s in specs)
        big = max(specs, key=lambda s: s["nbytes"])
        log(
            "plan",
            f"{cfg.name}: {len(specs)} tensors, {total / GB:.2f} GB in {len(shards)} shards; "
            f"largest tensor {big['name']} {big['nbytes'] / GB:.3f} GB",
        )
        print_space(targets, host_mem)
        res["plan"] = {
            "model": cfg.name,
            "layers": cfg.num_hidden_layers,
            "params": sum(math.prod(s["shape"]) for s in specs),
            "tensors": len(specs),
            "bytes": total,
            "shards": len(shards),
            "shard_gb": args.shard_gb,
            "largest_tensor": big["name"],
            "largest_tensor_bytes": big["nbytes"],
            "host_mem_assumed_gib": round(host_mem / GIB, 1),
            "cold": not args.warm,
        }
        usable = list(targets)
        while True:
            for t in usable:
                t.placed = 0
            for sh in shards:
                sh.pop("target", None)
            place(
                shards,
                usable,
                host_mem,
                int(args.mem_reserve_gib * GIB),
                int(args.disk_reserve_gib * GIB),
            )
            try:
                prepare_targets(usable)
                break
            except MountFailed as e:
                log("plan", f"{e}: planning without it")
                usable.remove(e.target)
                e.target.placed = 0
        res["plan"]["targets"] = [
            {
                "path": str(t.path),
                "fstype": "tmpfs" if t.mount else t.fs["fstype"],
                "mount": t.mount,
                "free_gb": round(t.fs["free"] / GB, 1),
                "placed": t.placed,
            }
            for t in targets
        ]
        for t in targets:
            n = sum(1 for s in shards if s["target"] == str(t.path))
            log("plan", f"{t.path}: {t.placed / GB:.1f} GB ({n} shards)")
        by_path = {str(t.path): t for t in targets}
        for sh in shards:
            sh["memory_backed"] = by_path[sh["target"]].memory_backed
        first = next(t for t in targets if t.placed)
        ck_dir = first.path / "checkpoint"
        ck_dir.mkdir()
        work = ck_dir  # state and phase results live with the checkpoint (deleted with it)
        state = {
            "model": args.model,
            "layers": args.layers,
            "device": args.device,
            "seed": args.seed,
            "specs": specs,
            "shards": shards,
            "ck_dir": str(ck_dir),
            "chunk_bytes": args.chunk_mb << 20,
            "write_jobs": args.write_jobs,
            "cold": not args.warm,
            "prompt_len": args.prompt_len,
            "gen_tokens": args.gen_tokens,
            "sample_ms": args.sample_ms,
            "t0": started,
            # leave the loader 90 s (or a third of the budget, if less) and cleanup 15 s
            "write_deadline": deadline - min(90.0, args.budget_s / 3) - 15,
        }
        sp = work / "state-write.json"
        state["result"] = str(work / "result-write.json")
        sp.write_text(json.dumps(state))
        log("plan", f"writing (budget {state['write_deadline'] - time.time():.0f} s)")
        code = run_phase("write", sp, state["write_deadline"] - time.time() + 15)
        wres = (
            json.loads(Path(state["result"]).read_text()) if Path(state["result"]).exists() else {}
        )
        res["write"] = wres
        if code != 0:
            raise PlanError(f"the writer failed (exit {code}): {wres.get('error')}")
        if args.corrupt:
            corrupt(ck_dir, args.corrupt)
            log("plan", f"corrupted {args.corrupt} (test)")
        sp = work / "state-load.json"
        state["result"] = str(work / "result-load.json")
        sp.write_text(json.dumps(state))
        log("plan", "loading in a fresh process")
        code = run_phase("load", sp, deadline - time.time() - 15)
        lres = (
            json.loads(Path(state["result"]).read_text()) if Path(state["result"]).exists() else {}
        )
        if "error" in lres or code not in (0, 1):
            raise PlanError(f"the loader failed (exit {code}): {lres.get('error')}")
        res["load"] = lres
        res["status"] = "ok" if code == 0 else "mismatch"
        rc = code
    except (Exception, KeyboardInterrupt) as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log("FAILED", res["error"])
        rc = 2
    finally:
        if not args.keep:
            try:
                res["cleanup"] = cleanup(targets, ck_dir, shards)
                log(
                    "cleanup",
                    f"deleted {res['cleanup']['files_deleted']} files "
                    f"({res['cleanup']['shard_bytes_deleted'] / GB:.1f} GB of shards)",
                )
            except Exception as e:  # noqa: BLE001 - reported
                res["cleanup"] = {"error": f"{type(e).__name__}: {e}"}
                log("cleanup", f"FAILED: {res['cleanup']['error']}")
        for s, h in old.items():
            signal.signal(s, h)
        res["total_s"] = round(time.time() - started, 1)
        j, m = write_results(Path(args.out), tag, res)
        log("done", f"{res['status']} in {res['total_s']} s; wrote {j} and {m.name}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
