"""Human-readable text of a :class:`~prfaas.bench.metrics.BenchReport`."""

from __future__ import annotations

from prfaas.bench.metrics import BenchReport, Dist


def _row(name: str, d: Dist | None) -> str:
    if d is None:
        return f"  {name:<6} {'-':>9} {'-':>9} {'-':>9} {'-':>9}       n=0"
    return (
        f"  {name:<6} {d.mean:9.1f} {d.p50:9.1f} {d.p90:9.1f} {d.p99:9.1f}  n={d.n}"
        f" (min {d.min:.1f}, max {d.max:.1f})"
    )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_text(rep: BenchReport) -> str:
    """A few lines for a terminal."""
    c = rep.config
    lines = []
    if c:
        src = c.get("source", "?")
        lines.append(
            f"prfaas bench: {c.get('url', '?')} model={c.get('model', '?')} "
            f"endpoint={c.get('endpoint', '?')} source={src}"
        )
    lines.append(
        f"requests: {rep.total} total, {rep.completed} completed, {rep.failed} failed"
        f" in {rep.duration_s:.2f} s"
    )
    if rep.errors:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in rep.errors.items()))
    lines.append(
        f"throughput: {rep.request_per_s:.3f} req/s, {rep.output_tokens_per_s:.1f} output tok/s,"
        f" {rep.input_tokens_per_s:.1f} input tok/s"
    )
    if rep.short_outputs:
        lines.append(f"short outputs (< max_tokens): {rep.short_outputs}")
    lines.append(f"  {'ms':<6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name, d in (("TTFT", rep.ttft_ms), ("TPOT", rep.tpot_ms), ("ITL", rep.itl_ms)):
        lines.append(_row(name, d))
    lines.append(_row("E2E", rep.e2e_ms))
    if rep.send_lag_ms is not None and rep.send_lag_ms.max > 50:
        lines.append(
            f"note: requests left up to {rep.send_lag_ms.max:.0f} ms after their arrival time"
            " (client load or --concurrency queueing)"
        )
    if rep.goodput is not None:
        g = rep.goodput
        slo = ", ".join(
            s
            for s in (
                None if g.slo_ttft_ms is None else f"TTFT <= {g.slo_ttft_ms:g} ms",
                None if g.slo_tpot_ms is None else f"TPOT <= {g.slo_tpot_ms:g} ms",
            )
            if s
        )
        lines.append(
            f"goodput ({slo}): {g.requests}/{rep.total} requests ({100 * g.fraction:.1f}%),"
            f" {g.request_per_s:.3f} req/s"
        )
    if rep.routing is not None:
        r = rep.routing
        by = ", ".join(f"{k}={v}" for k, v in r.by_prefill_cluster.items()) or "-"
        off = "-" if r.offload_fraction is None else f"{100 * r.offload_fraction:.1f}%"
        lines.append(f"routing ({r.requests_with_info} requests with info): prefill by {by}")
        lines.append(
            f"  offloaded {r.offloaded}/{r.offload_known} ({off}), cached tokens"
            f" {r.cached_tokens_total} ({r.cached_tokens_known} reported), KV bytes crossed"
            f" {_bytes(r.transfer_bytes_total)} ({r.transfer_bytes_known} reported)"
        )
    return "\n".join(lines)
