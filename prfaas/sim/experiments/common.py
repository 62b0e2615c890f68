"""What the simulator's recorded experiments share: the default trace, the systems' labels, the
machine line every report starts with, and how a report is written (``<stem>.json`` and
``<stem>.md`` under the output folder)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

DEFAULT_TRACE = Path("../shared/traces/mooncake_synthetic_trace.jsonl")
LABEL = {
    "prfaas": "PrfaaS-PD",
    "homogeneous_pd": "Homogeneous PD",
    "naive_heterogeneous": "Naive heterogeneous",
    "prfaas_fixed": "PrfaaS-PD fixed t",
}


def machine() -> str:
    """The machine line of a report: processor, CPU count, Python version."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def write_results(out: Path, stem: str, data: dict, md: str) -> None:
    """``data`` as ``out/<stem>.json`` (floats for numpy scalars), ``md`` as ``out/<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    (out / f"{stem}.md").write_text(md + "\n")
