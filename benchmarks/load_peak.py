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
   ``--gen-tokens`` greedy tokens (cache-free ``forward`` on the PyTorch paths,
   ``PRFAAS_DISABLE_FLA=1``: no autotuned kernels whose choice could differ between processes;
   ``--fused-forward`` takes the fused ones).
3. **load** (a fresh subprocess): ``build_model(checkpoint, device, bfloat16)`` (the streaming
   loader) while a thread reads ``/proc/self/status`` every ``--sample-ms`` (VmRSS, RssAnon,
   RssFile, RssShmem; VmHWM reset before the load; bytes read so far printed every 5 s). Then
   the check: every loaded tensor's digest equal to the writer's, and the prompt's logits
   bit-equal or (failing that) the same greedy tokens; if the forward itself fails, the
   digests alone decide and the error is reported. ``--read-configs 8x16 4x64 ...`` sets the
   loader's reads in flight x MiB per read (``READ_DEPTH`` x ``CHUNK_BYTES``) for this load and
   loads the same files again, each in a fresh process, with the others (digests checked):
   load time, read rate (from the bytes-read timeline) and peaks of each, in one table.

Writes ``--out/load_peak_<tag>.{json,md}`` (machine, command, figures, verdict) and deletes every
file it wrote (and a tmpfs it mounted) at the end, failure or not. Every phase prints progress
with timings; a phase that outruns ``--budget-s`` (whole run) fails with the reason, as does a
writer whose measured rate says it cannot finish in time.

    # the H200 (128 GiB RAM, 64 GiB disk, root): about 3-5 minutes. /dev/shm first, then a
    # tmpfs mounted for the rest (all in memory: 91.5 GiB of 128, 24 GiB kept free), the disk
    # only if the memory budget runs out
    python3 benchmarks/load_peak.py --dirs /dev/shm/loadpeak tmpfs:/mnt/loadpeak /tmp/loadpeak \
        --host-mem-gib 128 --tag h200 [--read-configs 8x16 4x64 16x8 16x4]  # +40 s a config
    # CPU dry run (what the test runs)
    python3 benchmarks/load_peak.py --model tiny --device cpu --dirs /tmp/x --shard-gb 0.001 \
        --out /tmp/x-results --tag cpu

Exit status: 0 when the load matched the reference, 1 on a mismatch, 2 on any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
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

from benchmarks.host_memory import (  # noqa: E402
    GB,
    GIB,
    MEMORY_FS,
    STATUS_KEYS,
    StatusSampler,
    cgroup_memory_limit,
    meminfo,
    reset_hwm,
)
from benchmarks.shard_placement import (  # noqa: E402
    MountFailed,
    PlanError,
    parse_target,
    place,
    prepare_targets,
    print_space,
)
from benchmarks.shard_placement import cleanup as remove_written  # noqa: E402
from benchmarks.synth_checkpoint import (  # noqa: E402
    corrupt,
    digests,
    model_config,
    plan_shards,
    release_config,
    safetensors_header,
    tensor_specs,
    write_all,
    write_staged,
)

_T0 = [time.time()]  # the run's start (subprocesses take the orchestrator's)


def log(phase: str, msg: str) -> None:
    print(f"[{time.time() - _T0[0]:7.1f}s {phase}] {msg}", flush=True)


def read_bytes() -> int:
    """Bytes this process has read (``rchar`` of /proc/self/io; 0 where unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def read_phase(timeline: list[tuple[float, int]], total: int) -> dict:
    """From a load's (seconds, bytes read) samples: when reading began (the first sample past
    1% of the bytes; before it the loader builds the model's modules and allocates them) and
    the read rate between 10% and 90% of the bytes (None where the load was too short)."""
    start = next((t for t, b in timeline if b > 0.01 * total), None)
    lo = next(((t, b) for t, b in timeline if b >= 0.1 * total), None)
    hi = next(((t, b) for t, b in timeline if b >= 0.9 * total), None)
    rate = None
    if lo and hi and hi[0] > lo[0]:
        rate = round((hi[1] - lo[1]) / (hi[0] - lo[0]) / GB, 3)
    return {"read_start_s": start, "read_gbps": rate}


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


def prompt_ids(cfg, n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(1234)
    hi = min(cfg.vocab_size, cfg.bos_token_id or cfg.vocab_size)
    ids = torch.randint(0, hi, (n,), generator=g).tolist()
    return ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + ids[: n - 1]


def run_prompt(model, ids: list[int], gen: int, device, fused: bool = False) -> dict:
    """Logits of ``ids`` (cache-free forward, (T, vocab) float32 on the CPU) and ``gen`` greedy
    tokens after them; an error is returned, not raised (the weight digests still decide).
    Unless ``fused``, the PyTorch paths (``PRFAAS_DISABLE_FLA=1``: no autotuned kernels, whose
    choices may differ between two processes), so that writer and loader can agree bit for bit."""
    import torch

    old = os.environ.get("PRFAAS_DISABLE_FLA")
    if not fused:
        os.environ["PRFAAS_DISABLE_FLA"] = "1"
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
    finally:
        if old is None:
            os.environ.pop("PRFAAS_DISABLE_FLA", None)
        else:
            os.environ["PRFAAS_DISABLE_FLA"] = old


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
    staged = dev.type == "cuda" or state["staged_write"]

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
            srcs = [sd[e["name"]].detach().reshape(-1).view(torch.uint8) for e in entries]
            if staged:
                if not hasattr(tls, "slots"):
                    cuda = dev.type == "cuda"
                    tls.stream = torch.cuda.Stream(dev) if cuda else None
                    tls.slots = [
                        torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)
                    ]

                def on_chunk(n: int) -> None:
                    with lock:
                        done[0] += n
                    deadline.check(done[0], total, started)
                    if stop.is_set():
                        raise TimeoutError("stopped")

                n = write_staged(fd, srcs, tls.slots, tls.stream, on_chunk)
                with lock:
                    done[0] += n % chunk
            else:
                for t in srcs:
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
    a = run_prompt(model, ids, state["gen_tokens"], dev, state["fused_forward"])
    b = run_prompt(model, ids, 0, dev, state["fused_forward"])
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


def phase_load(state: dict) -> int:
    sampler = StatusSampler(state["sample_ms"] / 1000).start()
    import torch

    from prfaas.model import checkpoint

    dev = torch.device(state["device"])
    if dev.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=dev)  # the CUDA context is part of the baseline, not of the load
    rcfg = state.get("read")
    if rcfg:  # the loader's reads in flight and bytes per read (module settings)
        checkpoint.READ_DEPTH = rcfg["read_depth"]
        checkpoint.CHUNK_BYTES = int(rcfg["chunk_mb"] * (1 << 20))
    ck = Path(state["ck_dir"])
    time.sleep(2 * state["sample_ms"] / 1000)
    hwm_reset = reset_hwm()
    base = sampler.reset()
    log("load", "baseline " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in base.items()))
    total = sum(sh["nbytes"] for sh in state["shards"])
    done = threading.Event()

    progress = Path(state["result"] + ".progress")

    timeline: list[tuple[float, int]] = []  # (seconds into the load, bytes read)

    def heartbeat(read0: int) -> None:
        """Every second: bytes read so far (/proc/self/io rchar) into the timeline and, with
        the peaks, into a file (the orchestrator reports it if this process dies); printed
        every 5 s."""
        while not done.wait(1.0):
            got, pk = read_bytes() - read0, sampler.peaks()
            el = time.perf_counter() - t0
            timeline.append((round(el, 2), got))
            if len(timeline) % 5 == 0:
                log(
                    "load",
                    f"{got / GB:.1f}/{total / GB:.1f} GB read, {el:.0f} s; "
                    f"peak RssAnon so far {pk['RssAnon'] / GIB:.2f} GiB",
                )
            with contextlib.suppress(OSError):
                progress.write_text(json.dumps({"read": got, "seconds": el, "peak": pk}))

    t0 = time.perf_counter()
    threading.Thread(target=heartbeat, args=(read_bytes(),), daemon=True).start()
    try:
        model = checkpoint.build_model(str(ck), device=dev, dtype=torch.bfloat16)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        done.set()
    load_s = time.perf_counter() - t0
    peak = sampler.peaks()
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
    if not state.get("check_forward", True):  # a further load of a sweep: the weights decide
        r = {"ids": r["ids"], "logits": None, "tokens": None}
    out = (
        run_prompt(model, r["ids"], len(r["tokens"] or []), dev, state["fused_forward"])
        if r["tokens"] is not None
        else {"logits": None, "tokens": None, "error": None}
    )
    logits_equal = max_diff = None
    if out["logits"] is not None and r["logits"] is not None:
        logits_equal = bool(torch.equal(out["logits"], r["logits"]))
        max_diff = float((out["logits"] - r["logits"]).abs().max())
    tokens_equal = out["tokens"] == r["tokens"] if r["tokens"] is not None else None
    if r["tokens"] is not None:
        log(
            "load",
            f"prompt: logits bit-equal {logits_equal} (max |diff| {max_diff}), greedy "
            f"{out['tokens']} vs reference {r['tokens']}",
        )
    sampler.stop()
    # every tensor byte-equal, and the prompt's logits bit-equal or (where they are not: kernels
    # whose reduction order varies) the same greedy tokens; with no forward (an error, reported)
    # the weights alone decide
    ok = not bad and (bool(logits_equal) or bool(tokens_equal))
    if out["error"] or ref["error"] or r["tokens"] is None:
        ok = not bad
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
        "read_config": {
            "read_depth": checkpoint.READ_DEPTH,
            "chunk_mb": checkpoint.CHUNK_BYTES / (1 << 20),
        },
        "timeline": timeline,
        **read_phase(timeline, total),
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
        + (
            " (disk shards flushed, then dropped from the page cache)"
            if pl.get("cold")
            and any(t["placed"] and t["fstype"] not in MEMORY_FS for t in pl.get("targets", []))
            else ""
        ),
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if wr.get("write_s") is not None:
        lines.append(
            f"| write (random weights on the device -> shards) | {wr.get('write_s')} s, "
            f"{wr.get('write_gbps')} GB/s |"
        )
    if ld:
        pk, base, over = ld["peak"], ld["baseline"], ld["peak_over_baseline"]
        lines += [
            f"| load (`build_model(dir, {res['device']}, bfloat16)`) | {ld['load_s']} s, "
            f"{ld['load_gbps']} GB/s |",
            f"| of which: modules built and allocated, then reading from | "
            f"{ld.get('read_start_s')} s; reads at {ld.get('read_gbps')} GB/s (10-90% of the "
            f"bytes; {ld.get('read_config')}) |",
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
    if res.get("sweep"):
        lines += [
            "Further loads of the same files, each in a fresh process, weights checked by digest:",
            "",
            "| reads in flight x MiB | load s | GB/s | reads from s | read GB/s | peak RssAnon "
            "| peak RssShmem | tensors equal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for sw in res["sweep"]:
            c = sw["config"]
            if "load_s" not in sw:
                lines.append(f"| {c} | {sw.get('error') or sw.get('skipped')} |")
                continue
            lines.append(
                f"| {c['read_depth']} x {c['chunk_mb']:g} | {sw['load_s']} | {sw['load_gbps']} | "
                f"{sw['read_start_s']} | {sw['read_gbps']} | {fmt_gib(sw['peak']['RssAnon'])} | "
                f"{fmt_gib(sw['peak']['RssShmem'])} | {sw['digests_equal']}/{sw['digests_total']} |"
            )
        lines.append("")
    m.write_text("\n".join(lines))
    return j, m


def parse_read_config(s: str) -> dict:
    """``DEPTHxCHUNK_MB`` (``8x32``): the loader's reads in flight and bytes per read."""
    depth, mb = s.lower().split("x")
    return {"read_depth": int(depth), "chunk_mb": float(mb)}


def load_once(
    state: dict, work: Path, name: str, rcfg: dict | None, forward: bool, deadline: float, res: dict
) -> tuple[dict, int]:
    """One load of the checkpoint in a fresh process (``rcfg``: its read depth and chunk, else
    the loader's defaults; ``forward``: also check the prompt's logits and tokens). Returns its
    result and exit status; a failure (with the loader's last progress) raises PlanError."""
    st = {**state, "read": rcfg, "check_forward": forward, "result": str(work / f"{name}.json")}
    sp = work / f"state-{name}.json"
    sp.write_text(json.dumps(st))
    log("plan", f"loading in a fresh process ({name}, reads: {rcfg or 'defaults'})")
    prog = Path(st["result"] + ".progress")  # the loader's, every second
    try:
        code = run_phase("load", sp, deadline - time.time() - 15)
    except PlanError as e:  # ran out of time: say how far it got
        last = json.loads(prog.read_text()) if prog.exists() else None
        res["load_progress"] = last
        raise PlanError(f"{e}; its last progress: {last}") from None
    lres = json.loads(Path(st["result"]).read_text()) if Path(st["result"]).exists() else {}
    if "error" in lres or code not in (0, 1):
        last = json.loads(prog.read_text()) if prog.exists() else None
        res["load_progress"] = last
        raise PlanError(
            f"the loader failed (exit {code}): {lres.get('error')}; its last progress: {last}"
        )
    return lres, code


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
    ap.add_argument("--chunk-mb", type=float, default=64, help="writer's pinned buffers")
    ap.add_argument("--staged-write", action="store_true", help=argparse.SUPPRESS)  # tests (CPU)
    ap.add_argument("--sample-ms", type=float, default=50.0)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm", action="store_true", help="keep disk shards in the page cache")
    ap.add_argument(
        "--read-configs",
        nargs="*",
        default=[],
        help="loader reads DEPTHxCHUNK_MB (e.g. 4x64 8x32 16x16): the first for the checked "
        "load, each further one another load of the same files (digests checked)",
    )
    ap.add_argument(
        "--fused-forward", action="store_true", help="reference forward on the fused GPU paths"
    )
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
        release_config(cfg)  # reads back to cfg (checked here, before anything is written)
        specs = tensor_specs(cfg)
        shards = plan_shards(specs, int(args.shard_gb * GB))
        total = sum(s["nbytes"] for s in specs)
        big = max(specs, key=lambda s: s["nbytes"])
        log(
            "plan",
            f"{cfg.name}: {len(specs)} tensors, {total / GB:.2f} GB in {len(shards)} shards; "
            f"largest tensor {big['name']} {big['nbytes'] / GB:.3f} GB",
        )
        print_space(targets, host_mem, log)
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
                prepare_targets(usable, log)
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
            "chunk_bytes": int(args.chunk_mb * (1 << 20)),
            "write_jobs": args.write_jobs,
            "cold": not args.warm,
            "staged_write": args.staged_write,
            "fused_forward": args.fused_forward,
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
        configs = [parse_read_config(c) for c in args.read_configs] or [None]
        lres, code = load_once(state, work, "load", configs[0], True, deadline, res)
        res["load"] = lres
        res["status"] = "ok" if code == 0 else "mismatch"
        rc = code
        res["sweep"] = []
        for i, rcfg in enumerate(configs[1:], 1):  # more loads of the same files, digests only
            if deadline - time.time() < 75:
                log("plan", f"no time left for read config {rcfg}: skipped")
                res["sweep"].append({"config": rcfg, "skipped": "no time left"})
                continue
            try:
                sres, scode = load_once(state, work, f"load-{i}", rcfg, False, deadline, res)
            except PlanError as e:
                log("FAILED", f"read config {rcfg}: {e}")
                res["sweep"].append({"config": rcfg, "error": str(e)})
                continue
            res["sweep"].append({"config": rcfg, **sres})
            if scode != 0:
                res["status"], rc = "mismatch", 1
    except (Exception, KeyboardInterrupt) as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log("FAILED", res["error"])
        rc = 2
    finally:
        if not args.keep:
            try:
                res["cleanup"] = remove_written(targets, ck_dir, shards, log)
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
