"""Transfer benchmark: loopback throughput of our TCP backend (1/2/4/8 connections) against a plain
single-socket ``sendall`` of the same bytes in the same run, the Mooncake backend, utilisation of
emulated 1 and 10 Gbps links, and (``--gpu``) GPU -> pinned host -> TCP -> GPU for a 32K-token
prompt of the Kimi Linear 48B geometry.

    python benchmarks/transfer.py            # CPU parts -> benchmarks/results/transfer_cpu.{json,md}
    python benchmarks/transfer.py --gpu      # GPU part  -> benchmarks/results/transfer_gpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import threading
import time
import zlib
from pathlib import Path

import torch

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


def plain_sendall(payload: list[memoryview], total: int) -> float:
    """Seconds to move ``payload`` over one loopback socket: sendall -> recv_into a buffer."""
    ls = socket.create_server(("127.0.0.1", 0))
    dst = memoryview(bytearray(total))
    done = threading.Event()

    def rx() -> None:
        s, _ = ls.accept()
        got = 0
        while got < total:
            got += s.recv_into(dst[got:], min(total - got, 1 << 22))
        s.sendall(b"k")
        s.close()
        done.set()

    t = threading.Thread(target=rx)
    t.start()
    c = socket.create_connection(ls.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for mv in payload:
        c.sendall(mv)
    c.recv(1)  # the receiver has every byte
    dt = time.perf_counter() - t0
    t.join()
    c.close()
    ls.close()
    return dt


def timed_transfers(
    backend: str, layout: CacheLayout, export, repeats: int, **tx_kwargs
) -> list[dict]:
    """Open -> delivered figures of ``repeats`` requests on one warm session (connection set-up
    and a first, untimed request excluded; the consumer releases each delivery's buffer)."""
    rx = create_receiver(backend, layout, SECRET).start()
    tx = create_sender(backend, layout, SECRET, **tx_kwargs)
    rows = []
    try:
        for i in range(repeats + 1):
            t0 = time.time()
            stream = tx.send_export(rx.address, export)
            stats = stream.wait(600)
            d = rx.deliveries.get(timeout=600)
            assert isinstance(d, Delivery), d
            d.release()
            if i:
                rows.append(
                    {
                        "seconds": d.timings.delivered_at - t0,
                        "last_byte_s": d.timings.last_byte_at - t0,
                        "bytes": stats.total_bytes,
                    }
                )
    finally:
        tx.close()
        rx.close()
    return rows


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def bench_cpu(tokens: int, repeats: int, shaped_mb: dict[float, int]) -> dict:
    layout = CacheLayout.kimi_linear_48b(max_tokens=max(tokens, 1))
    export = random_export(layout, "bench", 0, tokens, seed=1)
    payload = [tensor_bytes(t) for p in export.parts for t in p.tensors.values()]
    total = sum(len(m) for m in payload)
    out: dict = {"payload_bytes": total, "tokens": tokens, "loopback": []}
    t0 = time.perf_counter()
    for mv in payload:
        zlib.crc32(mv)
    out["crc32_gbps_one_core"] = gbps(total, time.perf_counter() - t0)  # paid on both ends
    for conns in (1, 2, 4, 8):
        plain = [plain_sendall(payload, total) for _ in range(repeats)]
        ours = [
            r["seconds"] for r in timed_transfers("tcp", layout, export, repeats, connections=conns)
        ]
        plain += [plain_sendall(payload, total) for _ in range(repeats)]
        row = {
            "backend": "tcp",
            "connections": conns,
            "ours_gbps": gbps(total, statistics.median(ours)),
            "plain_sendall_gbps": gbps(total, statistics.median(plain)),
        }
        row["ratio"] = row["ours_gbps"] / row["plain_sendall_gbps"]
        out["loopback"].append(row)
        print(row, flush=True)
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        backends = ["tcp"]
        print("mooncake not installed: its rows are skipped", flush=True)
    else:
        backends = ["tcp", "mooncake"]
    out["backends"] = backends
    if "mooncake" not in backends:
        return bench_shaped(out, layout, shaped_mb, backends)
    mc = [r["seconds"] for r in timed_transfers("mooncake", layout, export, repeats)]
    plain = [plain_sendall(payload, total) for _ in range(repeats)]
    row = {
        "backend": "mooncake",
        "connections": None,
        "ours_gbps": gbps(total, statistics.median(mc)),
        "plain_sendall_gbps": gbps(total, statistics.median(plain)),
    }
    row["ratio"] = row["ours_gbps"] / row["plain_sendall_gbps"]
    out["loopback"].append(row)
    print(row, flush=True)
    return bench_shaped(out, layout, shaped_mb, backends)


def bench_shaped(
    out: dict, layout: CacheLayout, shaped_mb: dict[float, int], backends: list[str]
) -> dict:
    out["shaped"] = []
    for link_gbps, mb in shaped_mb.items():
        n_tok = max(0, (mb * 1_000_000 - layout.request_nbytes(0)) // 1152 // 7)
        lay = CacheLayout.kimi_linear_48b(max_tokens=max(n_tok, 1))
        ex = random_export(lay, "shaped", 0, n_tok, seed=2)
        for backend in backends:
            rs = timed_transfers(
                backend, lay, ex, 1, connections=4, link=LinkShaperSpec(gbps=link_gbps)
            )
            r = rs[0]
            row = {
                "backend": backend,
                "link_gbps": link_gbps,
                "bytes": r["bytes"],
                "ideal_s": r["bytes"] * 8 / (link_gbps * 1e9),
                "last_byte_s": r["last_byte_s"],
                "delivered_s": r["seconds"],
            }
            row["utilisation"] = row["ideal_s"] / row["last_byte_s"]
            out["shaped"].append(row)
            print(row, flush=True)
    return out


def bench_gpu(tokens: int, repeats: int) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    layout = CacheLayout.kimi_linear_48b(max_tokens=tokens)
    export = random_export(layout, "gpu", 0, tokens, seed=3, device="cuda")
    total = export.nbytes()
    rows = []
    for conns in (1, 4, 8):
        times = []
        rx = create_receiver("tcp", layout, SECRET, pin_memory=True).start()
        tx = create_sender("tcp", layout, SECRET, connections=conns)
        for i in range(repeats + 1):  # the first (untimed) request fills the pinned buffer pool
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            stream = tx.send_export(rx.address, export)  # GPU -> pinned host inside send()
            d = rx.deliveries.get(timeout=600)
            assert isinstance(d, Delivery), d
            on_gpu = [
                t.to("cuda", non_blocking=True) for p in d.export.parts for t in p.tensors.values()
            ]
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            stream.wait(60)
            assert torch.equal(on_gpu[0], export.parts[0].tensors["state"])
            d.release()
        tx.close()
        rx.close()
        rows.append(
            {
                "connections": conns,
                "seconds": statistics.median(times),
                "gbps": gbps(total, statistics.median(times)),
            }
        )
        print(rows[-1], flush=True)
    return {"tokens": tokens, "payload_bytes": total, "gpu_to_gpu": rows}


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
        f"Host load average (1 min) when the run ended: {m['loadavg_1m_at_end']} "
        "(the dev VM is shared with other engineers' test runs).",
        "",
    ]
    if "loopback" in result:
        lines += [
            f"CRC-32 (zlib, one core) on this machine: {result['crc32_gbps_one_core']:.1f} Gbps; "
            "ours computes it once on each side, plain sendall not at all.",
            "",
            f"## Loopback, {result['payload_bytes'] / 1e6:.1f} MB per request "
            f"(Kimi Linear 48B geometry, {result['tokens']} tokens), median of {result['repeats']}",
            "",
            "| backend | connections | ours Gbps | plain sendall Gbps (same run) | ratio |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in result["loopback"]:
            lines.append(
                f"| {r['backend']} | {r['connections'] or '-'} | {r['ours_gbps']:.2f} | "
                f"{r['plain_sendall_gbps']:.2f} | {r['ratio']:.2f} |"
            )
        lines += [
            "",
            "## Emulated link (4 connections), utilisation = (bytes / rate) / last-byte time",
            "",
            "| backend | link Gbps | MB | ideal s | last byte s | utilisation |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["shaped"]:
            lines.append(
                f"| {r['backend']} | {r['link_gbps']} | {r['bytes'] / 1e6:.1f} | {r['ideal_s']:.3f} | "
                f"{r['last_byte_s']:.3f} | {r['utilisation']:.3f} |"
            )
    if "gpu_to_gpu" in result:
        lines += [
            f"## GPU -> pinned -> TCP -> GPU, {result['payload_bytes'] / 1e6:.1f} MB "
            f"({result['tokens']} tokens)",
            "",
            "| connections | seconds | Gbps |",
            "| --- | --- | --- |",
        ]
        for r in result["gpu_to_gpu"]:
            lines.append(f"| {r['connections']} | {r['seconds']:.3f} | {r['gbps']:.2f} |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="run the GPU -> GPU part only")
    ap.add_argument("--tokens", type=int, default=None, help="MLA tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    cmd = "python benchmarks/transfer.py " + " ".join(
        a for a in ["--gpu" if args.gpu else "", f"--repeats {args.repeats}"] if a
    )
    if args.gpu:
        tokens = args.tokens or 32768
        result = bench_gpu(tokens, args.repeats)
        name = "transfer_gpu"
    else:
        tokens = args.tokens if args.tokens is not None else 16384
        result = bench_cpu(tokens, args.repeats, {1.0: 150, 10.0: 600})
        name = "transfer_cpu"
    if args.tokens is not None:
        cmd += f" --tokens {args.tokens}"
    result.update(machine=machine(), command=cmd, repeats=args.repeats)
    write(args.out, name, result)
    print(f"wrote {args.out}/{name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
