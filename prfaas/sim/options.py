"""The simulator's options (:class:`SimOptions`) for one run of
:class:`~prfaas.sim.engine.Simulator`. Times in simulated seconds; invalid values raise
``ValueError`` at construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimOptions:
    tick_s: float = 1.0  # monitor interval: link readings, time series, policy.on_tick
    pipelined: bool = True  # layer-wise streaming of the KV during the prefill
    first_step: bool = True  # the first token needs one decode step after admission
    switch_cost_s: float = 30.0  # role switch: idle time after draining
    recent_window: int = 2000  # post-match lengths kept for adaptation
    until_s: float | None = None  # stop at this simulated time (unfinished requests stay open)
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {self.tick_s}")
        if self.switch_cost_s < 0 or self.recent_window < 1:
            raise ValueError("switch_cost_s must be >= 0 and recent_window >= 1")
        if self.until_s is not None and not self.until_s > 0:
            raise ValueError("until_s must be > 0")
