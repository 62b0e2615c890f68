"""Markdown tables and PNG plots of simulation summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prfaas.sim.result import SimResult


def _f(x, nd: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not np.isfinite(x):
        return "nan"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def summary_table(summaries: list[dict]) -> str:
    """One row per system: throughput, goodput, TTFT/TPOT/E2E percentiles, offload, egress."""
    rows = []
    for s in summaries:
        rows.append(
            [
                s["system"],
                s["completed"],
                s["throughput_rps"],
                s["goodput_rps"],
                s["ttft"]["mean"],
                s["ttft"]["p50"],
                s["ttft"]["p90"],
                s["ttft"]["p99"],
                s["tpot"]["mean"] * 1000,
                s["e2e"]["mean"],
                s["e2e"]["p90"],
                s["offload_fraction"],
                s["egress_gbps_mean"],
                s["cross_cluster_bytes"] / 1e9,
                ", ".join(f"{k} {v:.2f}" for k, v in s["cache_hit_rate"].items()),
            ]
        )
    return md_table(
        [
            "system",
            "completed",
            "thr (req/s)",
            "goodput (req/s)",
            "TTFT mean",
            "P50",
            "P90",
            "P99",
            "TPOT mean (ms)",
            "E2E mean",
            "E2E P90",
            "offload",
            "egress Gbps",
            "cross GB",
            "cache hit (tokens)",
        ],
        rows,
    )


def _save(fig, path: str | Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Lay out, write as PNG (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_series(results: list[SimResult], path: str | Path, title: str = "") -> Path:
    """Egress Gbps, prefill queues and requests in system over time, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for r in results:
        s = r.series
        t = np.asarray(s["t"])
        eg = sum((np.asarray(v) for k, v in s.items() if k.endswith(".gbps")), np.zeros_like(t))
        ax[0].plot(t, eg, label=r.system, lw=0.8)
        pq = sum(
            (np.asarray(v) for k, v in s.items() if k.endswith(".prefill_queue")), np.zeros_like(t)
        )
        ax[1].plot(t, pq, label=r.system, lw=0.8)
        ax[2].plot(t, s["in_system"], label=r.system, lw=0.8)
    ax[0].set_ylabel("egress (Gbps)")
    ax[1].set_ylabel("prefill queue (req)")
    ax[2].set_ylabel("in system (req)")
    ax[2].set_xlabel("time (s)")
    ax[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_ttft_cdf(results: list[SimResult], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        x = np.sort(r.ttft[np.isfinite(r.ttft)])
        if x.size:
            ax.plot(x, np.arange(1, x.size + 1) / x.size, label=r.system)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_bars(
    labels: list[str],
    groups: dict[str, list[float]],
    ylabel: str,
    path: str | Path,
    title: str = "",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    k = len(groups)
    x = np.arange(len(labels))
    w = 0.8 / max(k, 1)
    for j, (name, vals) in enumerate(groups.items()):
        ax.bar(x + (j - (k - 1) / 2) * w, vals, w, label=name)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
