"""What one simulator run returns (:class:`SimResult`): per-request times in simulated seconds
(NaN where the request did not reach that point), the request's lengths in tokens and the bytes it
moved across clusters, and per-tick time series (the keys: ``t``, ``in_system``, ``threshold``,
``<cluster>.prefill_queue`` / ``.decode_waiting`` / ``.decode_used`` in requests and
``<src>-><dst>.gbps`` / ``.capacity_est`` in Gbit/s)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from prfaas.scheduling.types import ClusterState


@dataclass
class SimResult:
    """Per-request times (NaN where not reached) and per-tick time series."""

    system: str
    workload: str
    n: int
    arrival: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray
    uncached: np.ndarray
    cached: np.ndarray
    prefill_start: np.ndarray
    prefill_end: np.ndarray
    kv_ready: np.ndarray
    decode_start: np.ndarray
    done: np.ndarray
    tpot: np.ndarray
    prefill_cluster: np.ndarray  # index into clusters
    offloaded: np.ndarray  # bool: prefilled outside the decode cluster
    cross_bytes: np.ndarray  # bytes this request moved across clusters (KV + cache copies)
    clusters: list[str]
    series: dict[str, list[float]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    end_s: float = 0.0
    wall_s: float = 0.0
    first_token: np.ndarray | None = None  # time of the first token (None: at decode_start)
    partial: bool = False  # the run was stopped (Simulator.stop) before its end

    @property
    def ttft(self) -> np.ndarray:
        t = self.decode_start if self.first_token is None else self.first_token
        return t - self.arrival

    @property
    def e2e(self) -> np.ndarray:
        return self.done - self.arrival


class TickSeries:
    """:attr:`SimResult.series` as a run fills it: one value per key and monitor tick (the keys in
    the order ``t``, ``in_system``, ``threshold``, the clusters', the links')."""

    def __init__(self, cluster_names: list[str], links: list[tuple[str, str]]) -> None:
        self.data: dict[str, list[float]] = {"t": [], "in_system": [], "threshold": []}
        self.cluster_names = cluster_names
        for nm in cluster_names:
            self.data[f"{nm}.prefill_queue"] = []
            self.data[f"{nm}.decode_waiting"] = []
            self.data[f"{nm}.decode_used"] = []
        for src, dst in links:
            self.data[f"{src}->{dst}.gbps"] = []
            self.data[f"{src}->{dst}.capacity_est"] = []

    def link(self, src: str, dst: str, throughput_gbps: float, capacity_gbps: float) -> None:
        """One tick's reading of the link ``src -> dst`` (Gbit/s)."""
        self.data[f"{src}->{dst}.gbps"].append(throughput_gbps)
        self.data[f"{src}->{dst}.capacity_est"].append(capacity_gbps)

    def tick(
        self, now: float, in_system: int, threshold: float | None, cstates: list[ClusterState]
    ) -> None:
        """One tick's time (s), requests in the system, the policy's threshold (None: NaN) and each
        cluster's queues from its observed state (``cstates``, in ``cluster_names``' order)."""
        self.data["t"].append(now)
        self.data["in_system"].append(in_system)
        self.data["threshold"].append(math.nan if threshold is None else float(threshold))
        for nm, cs in zip(self.cluster_names, cstates, strict=True):
            p, dp = cs.prefill, cs.decode
            self.data[f"{nm}.prefill_queue"].append(sum(p.queue_reqs) if p else 0)
            self.data[f"{nm}.decode_waiting"].append(sum(dp.waiting) if dp else 0)
            self.data[f"{nm}.decode_used"].append(sum(dp.slots_used) if dp else 0)
