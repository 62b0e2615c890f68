"""Transfer benchmark: loopback throughput of our TCP backend (1/2/4/8 connections) against a plain
single-socket ``sendall`` of the same bytes in the same run, the Mooncake backend, and utilisation
of emulated 1 and 10 Gbps links. CPU seconds per GB are per side, from the CPU clocks of the
sender's and the receiver's threads (kernel time of their syscalls included), and the checksum's
cost per GB (XXH3-64 against zlib CRC-32) is measured on the same bytes. GPU -> TCP -> GPU is
``benchmarks/transfer_gpu.py``.

    python benchmarks/transfer.py                  # -> benchmarks/results/transfer_loopback.{json,md}
    python benchmarks/transfer.py --only tcp --connections 1 2 --repeats 3
                                                   # a part only -> transfer_loopback_only.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prfaas

from prfaas.kv.layout import CacheLayout
from prfaas.kv.synthetic import random_export
from prfaas.transfer.backend import Delivery
from prfaas.transfer.link import LinkShaperSpec
from prfaas.transfer.registry import create_receiver, create_sender
from prfaas.transfer.wire import tensor_bytes

SECRET = "benchmark-secret-0123456789"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the host skews figures
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# CPU clocks read per request: the sender's threads (tx*: I/O and dispatcher; mc*: Mooncake's),
# the receiver's (rx*), and the sender's dispatcher alone (it hashes the tcp slices)
THREADS = ("tx", "mc", "rx", "tx-dispatch")


def thread_cpu(prefixes: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of the live threads, summed by name prefix (tx: sender, rx: receiver)."""
    out = dict.fromkeys(prefixes, 0.0)
    for t in threading.enumerate():
        for p in prefixes:
            if t.name.startswith(p) and t.ident is not None:
                with contextlib.suppress(OSError):  # the thread just ended
                    out[p] += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return out


def plain_sendall(payload: list[memoryview], total: int) -> tuple[float, float, float]:
    """Seconds to move ``payload`` over one loopback socket (sendall -> recv_into a buffer), and
    the CPU seconds of the sending and the receiving thread."""
    ls = socket.create_server(("127.0.0.1", 0))
    dst = memoryview(bytearray(total))
    rx_cpu = [0.0]

    def rx() -> None:
        s, _ = ls.accept()
        c0 = time.thread_time()
        got = 0
        while got < total:
            got += s.recv_into(dst[got:], min(total - got, 1 << 22))
        rx_cpu[0] = time.thread_time() - c0
        s.sendall(b"k")
        s.close()

    t = threading.Thread(target=rx, name="plain-rx")
    t.start()
    c = socket.create_connection(ls.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0, c0 = time.perf_counter(), time.thread_time()
    for mv in payload:
        c.sendall(mv)
    tx_cpu = time.thread_time() - c0
    c.recv(1)  # the receiver has every byte
    dt = time.perf_counter() - t0
    t.join()
    c.close()
    ls.close()
    return dt, tx_cpu, rx_cpu[0]


def timed_transfers(
    backend: str,
    layout: CacheLayout,
    export,
    repeats: int,
    baselines: dict | None = None,
    **tx_kwargs,
) -> list[dict]:
    """Open -> delivered figures of ``repeats`` requests on one warm session (connection set-up
    and a first, untimed request excluded; the consumer releases each delivery's buffer), with
    the CPU seconds of the sender's (tx*, mc*) and the receiver's (rx*) threads and of the whole
    process (which also counts Mooncake's own threads). ``baselines``: name -> a function run
    right before each timed request (same bytes, same moment: a fair pair under shared load),
    its result stored in the row under that name."""
    rx = create_receiver(backend, layout, SECRET).start()
    tx = create_sender(backend, layout, SECRET, **tx_kwargs)
    rows = []
    try:
        for i in range(repeats + 1):
            row: dict = {}
            if i:
                for name, fn in (baselines or {}).items():
                    row[name] = fn()
            cpu0, p0 = thread_cpu(THREADS), time.process_time()
            t0 = time.time()
            stream = tx.send_export(rx.address, export)
            stats = stream.wait(600)
            d = rx.deliveries.get(timeout=600)
            assert isinstance(d, Delivery), d
            cpu1, p1 = thread_cpu(THREADS), time.process_time()
            for part in d.export.parts:  # the pooled buffer must not hold the next request's
                for t in part.tensors.values():  # bytes already (Mooncake writes outside our
                    t.zero_()  # sockets: only the checksums show the bytes really came)
            d.release()
            if i:
                row.update(
                    {
                        "seconds": d.timings.delivered_at - t0,
                        "last_byte_s": d.timings.last_byte_at - t0,
                        "first_data_s": (d.timings.first_data_at or t0) - t0,
                        "bytes": stats.total_bytes,
                        "connections": len(tx.session(rx.address).socks),
                        "tx_cpu_s": cpu1["tx"] - cpu0["tx"] + cpu1["mc"] - cpu0["mc"],
                        "tx_dispatch_cpu_s": cpu1["tx-dispatch"] - cpu0["tx-dispatch"],
                        "rx_cpu_s": cpu1["rx"] - cpu0["rx"],
                        "process_cpu_s": p1 - p0,
                    }
                )
                rows.append(row)
    finally:
        tx.close()
        rx.close()
    return rows


def plain_mooncake(export) -> Callable[[], float]:
    """Mooncake's own ceiling here: a function timing one ``batch_transfer_sync_write`` of all
    the export's bytes (16 MiB slices) into a registered buffer, through the TransferEngine our
    backend uses, none of our code around it (no control connection, no checksums)."""
    from prfaas.transfer.mooncake_backend import _engine

    eng = _engine("127.0.0.1")
    target = f"127.0.0.1:{eng.get_rpc_port()}"
    tensors = [t for p in export.parts for t in p.tensors.values()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    dst = torch.empty(total, dtype=torch.uint8)
    dst.fill_(0)  # faulted in, as our receiver's pooled buffers are
    if eng.register_memory(dst.data_ptr(), total) != 0:
        raise RuntimeError("mooncake register_memory failed")
    srcs, dsts, lens, off, sl = [], [], [], 0, 16 << 20
    for t in tensors:
        n = t.numel() * t.element_size()
        for o in range(0, n, sl):
            srcs.append(t.data_ptr() + o)
            dsts.append(dst.data_ptr() + off + o)
            lens.append(min(sl, n - o))
        off += n

    def run() -> float:
        t0 = time.perf_counter()
        if eng.batch_transfer_sync_write(target, srcs, dsts, lens) != 0:
            raise RuntimeError("mooncake write failed")
        return time.perf_counter() - t0

    run.keep = dst  # type: ignore[attr-defined]  # the registered buffer lives with the function
    return run


def checksum_cost(payload: list[memoryview], total: int) -> dict:
    """Seconds per GB of the layer checksum (XXH3-64) and of zlib CRC-32 over the same bytes."""
    out = {}
    for name, fn in (
        ("xxh3_64", xxhash.xxh3_64_intdigest),
        ("crc32", zlib.crc32),
    ):
        best, cpu = float("inf"), float("inf")
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.thread_time()
            for mv in payload:
                fn(mv)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.thread_time() - c0)
        out[f"{name}_s_per_gb"] = cpu / (total / 1e9)  # CPU seconds: other load does not count
        out[f"{name}_gbps"] = gbps(total, cpu)
    return out


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def _row(backend: str, conns: int | None, total: int, ours: list[dict]) -> dict:
    """Medians over the pairs; ``ratio`` is the median of the per-pair ratios (each timed request
    against the plain sendall run right before it)."""
    gb = total / 1e9
    med = statistics.median

    def plain(i: int) -> float:
        return med(r["plain"][i] for r in ours)

    row = {
        "backend": backend,
        "connections": conns,
        "pairs": len(ours),
        "ours_gbps": gbps(total, med(r["seconds"] for r in ours)),
        "plain_sendall_gbps": gbps(total, plain(0)),
        "ratio": med(r["plain"][0] / r["seconds"] for r in ours),
        "ours_tx_cpu_s_per_gb": med(r["tx_cpu_s"] for r in ours) / gb,
        "ours_tx_dispatch_cpu_s_per_gb": med(r["tx_dispatch_cpu_s"] for r in ours) / gb,
        "ours_rx_cpu_s_per_gb": med(r["rx_cpu_s"] for r in ours) / gb,
        "ours_process_cpu_s_per_gb": med(r["process_cpu_s"] for r in ours) / gb,
        "plain_tx_cpu_s_per_gb": plain(1) / gb,
        "plain_rx_cpu_s_per_gb": plain(2) / gb,
        "first_data_ms": 1e3 * med(r["first_data_s"] for r in ours),
        "last_byte_to_delivered_ms": 1e3 * med(r["seconds"] - r["last_byte_s"] for r in ours),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if "mooncake_plain" in ours[0]:
        row["mooncake_plain_gbps"] = gbps(total, med(r["mooncake_plain"] for r in ours))
        row["ratio_to_mooncake_plain"] = med(r["mooncake_plain"] / r["seconds"] for r in ours)
    return row


def bench_cpu(
    tokens: int,
    repeats: int,
    shaped_mb: dict[float, int],
    parts: set[str] = frozenset({"tcp", "mooncake", "shaped"}),
    connections: list[int | None] | None = None,
) -> dict:
    """The loopback rows (``parts``: tcp, mooncake, shaped); tcp at ``connections`` (None in the
    list: sized by the sender; default 1, 2, 4, 8 and sized)."""
    layout = CacheLayout.kimi_linear_48b(max_tokens=max(tokens, 1))
    export = random_export(layout, "bench", 0, tokens, seed=1)
    payload = [tensor_bytes(t) for p in export.parts for t in p.tensors.values()]
    total = sum(len(m) for m in payload)
    out: dict = {"payload_bytes": total, "tokens": tokens, "loopback": []}
    out["checksum"] = checksum_cost(payload, total)
    print(out["checksum"], flush=True)
    plain = {"plain": lambda: plain_sendall(payload, total)}
    for conns in (connections or [1, 2, 4, 8, None]) if "tcp" in parts else []:
        kw = {} if conns is None else {"connections": conns}  # None: sized to the link
        ours = timed_transfers("tcp", layout, export, repeats, plain, **kw)
        row = _row("tcp", ours[0]["connections"], total, ours)
        row["sized"] = conns is None
        out["loopback"].append(row)
        print(row, flush=True)
    backends = ["tcp"]
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        print("mooncake not installed: its rows are skipped", flush=True)
    else:
        backends.append("mooncake")
    out["backends"] = backends
    if "mooncake" in backends and "mooncake" in parts:
        base = {**plain, "mooncake_plain": plain_mooncake(export)}
        mc = timed_transfers("mooncake", layout, export, repeats, base)
        row = _row("mooncake", None, total, mc)
        out["loopback"].append(row)
        print(row, flush=True)
    if "shaped" not in parts:
        out["shaped"] = []
        return out
    return bench_shaped(out, layout, shaped_mb, backends)


def bench_shaped(
    out: dict, layout: CacheLayout, shaped_mb: dict[float, int], backends: list[str]
) -> dict:
    """Utilisation of emulated links; each row also has what an unshaped plain sendall of the
    same bytes reaches right before it (the host's own ceiling under its current load: a link
    faster than that cannot be filled by anything on this host)."""
    out["shaped"] = []
    for link_gbps, mb in shaped_mb.items():
        n_tok = max(0, (mb * 1_000_000 - layout.request_nbytes(0)) // 1152 // 7)
        lay = CacheLayout.kimi_linear_48b(max_tokens=max(n_tok, 1))
        ex = random_export(lay, "shaped", 0, n_tok, seed=2)
        payload = [tensor_bytes(t) for p in ex.parts for t in p.tensors.values()]
        total = sum(len(m) for m in payload)
        plain = {"plain": lambda payload=payload, total=total: plain_sendall(payload, total)}
        for backend in backends:
            rs = timed_transfers(
                backend, lay, ex, 1, plain, connections=4, link=LinkShaperSpec(gbps=link_gbps)
            )
            r = rs[0]
            row = {
                "backend": backend,
                "link_gbps": link_gbps,
                "bytes": r["bytes"],
                "ideal_s": r["bytes"] * 8 / (link_gbps * 1e9),
                "last_byte_s": r["last_byte_s"],
                "delivered_s": r["seconds"],
                "host_plain_sendall_gbps": gbps(total, r["plain"][0]),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
            row["utilisation"] = row["ideal_s"] / row["last_byte_s"]
            out["shaped"].append(row)
            print(row, flush=True)
    return out


def write(out_dir: Path, name: str, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# Transfer benchmark ({name})",
        "",
        f"Machine: {m['cpu_model']}, nproc {m['nproc']}, {m['platform']}, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"Command: `{result['command']}`",
        f"Host load average (1 min) when the run started / ended: "
        f"{result.get('loadavg_1m_at_start', '?')} / {m['loadavg_1m_at_end']} "
        "(the dev VM is shared with other engineers' test runs).",
        "",
    ]
    c = result["checksum"]
    if result["loopback"]:
        lines += [
            f"Checksum cost on this machine (CPU seconds of one core over the request's bytes, "
            f"in memory, not in cache): XXH3-64 {c['xxh3_64_s_per_gb']:.3f} s/GB "
            f"({c['xxh3_64_gbps']:.0f} Gbps), zlib CRC-32 {c['crc32_s_per_gb']:.3f} s/GB "
            f"({c['crc32_gbps']:.0f} Gbps). Ours computes XXH3-64 once per side: the sender's "
            "dispatcher thread hashes each slice ahead of the I/O thread that writes it (on "
            "another core, from 2 cores up), the receiver hashes bytes as they land and checks "
            "each slice; plain sendall checks nothing.",
            "",
            f"## Loopback, {result['payload_bytes'] / 1e6:.1f} MB per request "
            f"(Kimi Linear 48B geometry, {result['tokens']} tokens), {result['repeats']} pairs",
            "",
            "Each timed request is paired with a plain single-socket `sendall` -> `recv_into` of "
            "the same bytes run right before it, in the same process (both ends of both on this "
            "host's cores, so both compete with the same load); 'ratio' is the median of the "
            "per-pair ratios (Gbps columns: medians). CPU s/GB: CPU time of the side's threads "
            "(user + kernel) per GB of payload. 'sized' = connection count chosen by the sender "
            "for the link. Mooncake: 'plain' is still sendall; its own ceiling (one "
            "`batch_transfer_sync_write` of the same bytes, none of our code) is under the table.",
            "",
            "| backend | connections | ours Gbps | plain sendall Gbps | ratio (pairs) | "
            "ours tx / rx CPU s/GB | plain tx / rx CPU s/GB | first byte ms | last byte -> "
            "delivered ms | load 1m |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["loopback"]:
            conns = f"{r['connections'] or '-'}" + (" (sized)" if r.get("sized") else "")
            lines.append(
                f"| {r['backend']} | {conns} | {r['ours_gbps']:.2f} | "
                f"{r['plain_sendall_gbps']:.2f} | {r['ratio']:.2f} | "
                f"{r['ours_tx_cpu_s_per_gb']:.3f} / {r['ours_rx_cpu_s_per_gb']:.3f} | "
                f"{r['plain_tx_cpu_s_per_gb']:.3f} / {r['plain_rx_cpu_s_per_gb']:.3f} | "
                f"{r['first_data_ms']:.1f} | {r['last_byte_to_delivered_ms']:.1f} | "
                f"{r['loadavg_1m']} |"
            )
        for r in result["loopback"]:
            if "mooncake_plain_gbps" in r:
                lines += [
                    "",
                    f"Mooncake's own ceiling here (same run, same bytes, 16 MiB slices, one batch): "
                    f"{r['mooncake_plain_gbps']:.2f} Gbps; our Mooncake backend reaches "
                    f"{r['ratio_to_mooncake_plain']:.2f}x of it (median of pairs). Its process "
                    "CPU (Mooncake's own threads included) is "
                    f"{r['ours_process_cpu_s_per_gb']:.3f} s/GB.",
                ]
    tcp1 = [r for r in result["loopback"] if r["backend"] == "tcp" and r["connections"] == 1]
    if tcp1:
        r1 = tcp1[0]
        ours_cpu = r1["ours_tx_cpu_s_per_gb"] + r1["ours_rx_cpu_s_per_gb"]
        plain_cpu = r1["plain_tx_cpu_s_per_gb"] + r1["plain_rx_cpu_s_per_gb"]
        lines += [
            "",
            "### Where the time goes (tcp, 1 connection)",
            "",
            f"Both ends run in this one process on {m['nproc']} cores that other work shares "
            f"(load above). Ours spends {ours_cpu:.3f} s/GB (sender "
            f"{r1['ours_tx_cpu_s_per_gb']:.3f}, of it {r1['ours_tx_dispatch_cpu_s_per_gb']:.3f} "
            "on the dispatcher thread that hashes the slices and the rest on the I/O thread that "
            f"writes them; receiver {r1['ours_rx_cpu_s_per_gb']:.3f}) where plain sendall spends "
            f"{plain_cpu:.3f} (ratio of CPU {plain_cpu / ours_cpu:.2f}, of throughput "
            f"{r1['ratio']:.2f}). Of the difference ({ours_cpu - plain_cpu:.3f} s/GB) the two "
            f"checksum passes take about {c['xxh3_64_s_per_gb'] + 0.04:.2f}: the sender's reads "
            f"the bytes from memory (XXH3-64 {c['xxh3_64_s_per_gb']:.3f} s/GB, the checksum line "
            "above), on the dispatcher, "
            "beside the I/O thread's copy on the other core; the receiver hashes each piece of "
            "at most 256 KiB right after `recv_into` landed it, still in L2 (~0.04 s/GB here); "
            "the rest is the Python around the syscalls. On a quiet host the sender's I/O thread "
            "and the cross-core wake-ups of both ends set the pace (plain sendall's sender then "
            "costs ~0.4 s/GB, against ~0.18 when the other core is busy and both ends share "
            "one), and the hash beside it costs little time; on a busy host the run is "
            "CPU-bound and throughput follows the total CPU per byte. A `perf` profile of this "
            "path is in docs/transfer.md (Measured). The "
            "request's fixed "
            "costs: header (JSON + base64 token ids, SHA-256) and the first slice, "
            f"{r1['first_data_ms']:.1f} ms from open to the first byte in; the tail from the last "
            f"byte in to the delivery is {r1['last_byte_to_delivered_ms']:.1f} ms (slices are "
            "verified as they land).",
        ]
    if result["shaped"]:
        lines += [
            "",
            "## Emulated link (4 connections), utilisation = (bytes / rate) / last-byte time",
            "",
            "'host plain sendall': an unshaped plain sendall of the same bytes right before "
            "(what this host moves at all under its current load; a link faster than that cannot "
            "be filled).",
            "",
            "| backend | link Gbps | MB | ideal s | last byte s | utilisation | "
            "host plain sendall Gbps | load 1m |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["shaped"]:
            lines.append(
                f"| {r['backend']} | {r['link_gbps']} | {r['bytes'] / 1e6:.1f} | "
                f"{r['ideal_s']:.3f} | {r['last_byte_s']:.3f} | {r['utilisation']:.3f} | "
                f"{r['host_plain_sendall_gbps']:.2f} | {r['loadavg_1m']} |"
            )
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="MLA tokens per request")
    ap.add_argument("--repeats", type=int, default=5, help="timed pairs per row")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["tcp", "mooncake", "shaped"],
        help="run these parts only (results go to transfer_loopback_only unless --name)",
    )
    ap.add_argument(
        "--connections",
        nargs="+",
        type=int,
        help="tcp rows at these connection counts only (0: sized by the sender)",
    )
    ap.add_argument("--name", help="results file name (default transfer_loopback)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    cmd = f"python benchmarks/transfer.py --repeats {args.repeats}"
    if args.tokens != 16384:
        cmd += f" --tokens {args.tokens}"
    if args.only:
        cmd += " --only " + " ".join(args.only)
    if args.connections:
        cmd += " --connections " + " ".join(map(str, args.connections))
    partial = bool(args.only or args.connections)
    name = args.name or ("transfer_loopback_only" if partial else "transfer_loopback")
    conns = [c or None for c in args.connections] if args.connections else None
    load_start = round(os.getloadavg()[0], 2)
    parts = set(args.only or ["tcp", "mooncake", "shaped"])
    result = bench_cpu(args.tokens, args.repeats, {1.0: 150, 10.0: 600}, parts, conns)
    result.update(
        machine=machine(), command=cmd, repeats=args.repeats, loadavg_1m_at_start=load_start
    )
    write(args.out, name, result)
    print(f"wrote {args.out}/{name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
