"""Text / markdown tables and PNG plots of planner results."""

from __future__ import annotations

from pathlib import Path

NAMES = {
    "prfaas": "PrfaaS-PD",
    "homogeneous_pd": "Homogeneous PD",
    "naive_heterogeneous": "Naive heterogeneous",
}


def _n(x: float | int | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or x == 0 else fmt.format(x)


def _k(t: float | None) -> str:
    return "—" if t is None else f"{t / 1000:.1f}K"


def table6_rows(result: dict) -> list[tuple[str, list[str]]]:
    systems = result["systems"]
    cols = list(systems)
    rows = [
        ("threshold t", [_k(systems[c]["threshold"]) for c in cols]),
        (
            "N_prfaas / N_p / N_d",
            [
                " / ".join(_n(systems[c][k], "{:d}") for k in ("n_prfaas", "n_p", "n_d"))
                for c in cols
            ],
        ),
        (
            "Θ_prfaas / Θ_pd-p / Θ_pd-d (req/s)",
            [
                " / ".join(_n(systems[c][k]) for k in ("theta_prfaas", "theta_pd_p", "theta_pd_d"))
                for c in cols
            ],
        ),
        ("Λ_max (req/s)", [f"{systems[c]['lambda_max']:.2f}" for c in cols]),
        (
            "throughput ratio",
            ["—" if systems[c]["ratio"] is None else f"{systems[c]['ratio']:.2f}×" for c in cols],
        ),
        ("offloaded", [f"{100 * systems[c]['offload_fraction']:.1f}%" for c in cols]),
        ("mean egress (Gbps)", [_n(systems[c]["egress_gbps"], "{:.1f}") for c in cols]),
        ("bound by", [systems[c]["bound"] for c in cols]),
    ]
    return [("", [NAMES.get(c, c) for c in cols])] + rows


def format_table(result: dict, markdown: bool = False) -> str:
    """Table 6 of the paper (plus offload fraction, egress and the binding stage)."""
    rows = table6_rows(result)
    if markdown:
        lines = ["| " + " | ".join([rows[0][0], *rows[0][1]]) + " |"]
        lines.append("|" + " --- |" * (len(rows[0][1]) + 1))
        lines += ["| " + " | ".join([r[0], *r[1]]) + " |" for r in rows[1:]]
        return "\n".join(lines)
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(r[1][i]) for r in rows) for i in range(len(rows[0][1]))]
    out = []
    for label, vals in rows:
        out.append(
            "  ".join([label.ljust(w0), *(v.rjust(w) for v, w in zip(vals, ws, strict=True))])
        )
    return "\n".join(out)


def format_extras(result: dict, markdown: bool = False) -> str:
    lines = []
    eq = result.get("equal_cost", {})
    for name, e in eq.items():
        if "ratio_at_equal_cost" in e:
            lines.append(
                f"{NAMES.get(name, name)} at equal cost: {e['ratio_at_equal_cost']:.3f}× homogeneous PD"
                f" (cost {e['cost_per_hour']:g} vs {e['baseline_cost_per_hour']:g} per hour)"
                + (
                    f"; break-even price ratio {e['price_ratio']} = {e['break_even_price_ratio']:.2f}"
                    if "break_even_price_ratio" in e
                    else ""
                )
            )
    fe = result.get("fleet_egress")
    if fe:
        lines.append(
            f"Fleet egress of {fe['n_gpus']} GPUs ({fe['gpus_per_instance']} per instance) at "
            f"L_avg = {fe['l_avg'] / 1024:.0f}K:"
        )
        for m, r in fe["models"].items():
            lines.append(f"  {m}: Φ_kv {r['phi_kv_gbps']:.2f} Gbps -> {r['egress_gbps']:.0f} Gbps")
    if not markdown:
        return "\n".join(lines)
    return "\n".join("  - " + x.strip() if x.startswith("  ") else "- " + x for x in lines)


def format_link_sweep(rows: list[dict], markdown: bool = False) -> str:
    head = [
        "link Gbps",
        "t",
        "N_p/N_d",
        "Λ_max",
        "ratio",
        "offload",
        "egress Gbps",
        "util",
        "bound",
    ]
    body = [
        [
            f"{r['link_gbps']:g}",
            _k(r["threshold"]),
            f"{r['n_p']}/{r['n_d']}",
            f"{r['lambda_max']:.2f}",
            "—" if r["ratio"] is None else f"{r['ratio']:.2f}×",
            f"{100 * r['offload_fraction']:.1f}%",
            f"{r['egress_gbps']:.2f}",
            f"{100 * r['link_utilisation']:.0f}%",
            r["bound"] + (" (bandwidth)" if r["prfaas_bandwidth_bound"] else ""),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    ws = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(x, ws, strict=True)) for x in [head, *body]
    )


def plot_figure5(fig5: dict, out_dir: str | Path) -> list[Path]:
    """Write figure5a_split.png and figure5b_threshold.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    s, t = fig5["split"], fig5["threshold"]
    n_total = max(s["n_p"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(s["n_p"], s["lambda_max"], "o-")
    ax.set_xticks(s["n_p"], [f"{p}/{n_total - p}" for p in s["n_p"]])
    ax.set_xlabel("N_p / N_d")
    ax.set_ylabel("Λ_max (req/s)")
    ax.set_title(f"(a) split sweep at t = {s['threshold'] / 1000:.1f}K")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    pa = d / "figure5a_split.png"
    fig.savefig(pa, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    tk = [x / 1000 for x in t["t"]]
    ax.plot(tk, t["prfaas_limit"], "--", label="Θ_prfaas / p")
    ax.plot(tk, t["pd_p_limit"], "--", label="Θ_pd-p / (1-p)")
    ax.plot(tk, t["pd_d_limit"], ":", label="Θ_pd-d")
    ax.plot(tk, t["lambda_max"], "k-", lw=2, label="Λ_max")
    top = max(t["lambda_max"]) * 2
    ax.set_ylim(0, top)
    ax.set_xlabel("threshold t (K tokens)")
    ax.set_ylabel("req/s")
    ax.set_title(f"(b) threshold sweep, N_p/N_d = {t['n_p']}/{t['n_d']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    pb = d / "figure5b_threshold.png"
    fig.savefig(pb, dpi=120)
    plt.close(fig)
    return [pa, pb]


def plot_link_sweep(rows: list[dict], out_dir: str | Path) -> Path:
    """Write link_sweep.png: Λ_max and optimal t vs link bandwidth (log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    links = [r["link_gbps"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.semilogx(links, [r["lambda_max"] for r in rows], "o-", label="Λ_max (req/s)")
    ax.set_xlabel("cross-cluster link (Gbps)")
    ax.set_ylabel("Λ_max (req/s)")
    ax2 = ax.twinx()
    ax2.semilogx(
        links, [(r["threshold"] or 0) / 1000 for r in rows], "s--", color="C1", label="t (K)"
    )
    ax2.set_ylabel("optimal t (K tokens)")
    bw = [r["link_gbps"] for r in rows if r["prfaas_bandwidth_bound"]]
    if bw:
        ax.axvspan(min(links), max(bw), color="grey", alpha=0.15, label="PrfaaS bandwidth-bound")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = d / "link_sweep.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def format_vs_paper(result: dict, paper: dict) -> str:
    """Markdown table: model figures next to the paper's (relative difference)."""
    keys = (
        "threshold",
        "theta_prfaas",
        "theta_pd_p",
        "theta_pd_d",
        "lambda_max",
        "offload_fraction",
        "egress_gbps",
        "ratio",
    )
    lines = ["| system | quantity | model | paper | diff |", "| --- | --- | --- | --- | --- |"]
    for name, ref in paper.items():
        got = result["systems"].get(name)
        if not isinstance(ref, dict) or got is None:
            continue
        for k in keys:
            if ref.get(k) is None or got.get(k) is None:
                continue
            m, p = float(got[k]), float(ref[k])
            diff = f"{100 * (m - p) / p:+.1f}%" if p else "—"
            ms = f"{m:.0f}" if k == "threshold" else f"{m:.4g}"
            lines.append(f"| {NAMES.get(name, name)} | {k} | {ms} | {p:g} | {diff} |")
    return "\n".join(lines)
