"""Conversions between the control-plane messages (``prfaas.server.protocol``) and the engine's
types: sampling parameters, and the engine's ``time.monotonic()`` stamps as ``time.time()``."""

from __future__ import annotations

import time

from prfaas.engine import RequestOutput, SamplingParams
from prfaas.server.protocol import SamplingParamsMsg


def engine_params(msg: SamplingParamsMsg) -> SamplingParams:
    """The engine's ``SamplingParams`` of a wire message (ValueError if the engine refuses them)."""
    return SamplingParams(**msg.model_dump())


def params_msg(p: SamplingParams) -> SamplingParamsMsg:
    """The wire form of the engine's ``SamplingParams``."""
    return SamplingParamsMsg(**{k: getattr(p, k) for k in SamplingParamsMsg.model_fields})


def wall_time(mono: float | None) -> float | None:
    """A ``time.monotonic()`` reading (the engine's request metrics) as ``time.time()``: the
    per-request timings cross processes and are compared with the transfer layer's."""
    return None if mono is None else mono + (time.time() - time.monotonic())


def engine_marks(out: RequestOutput) -> dict[str, float | None]:
    """The engine's per-request stamps of ``out`` (``RequestMetrics``) as ``time.time()``."""
    m = out.metrics
    if m is None:
        return {}
    return {
        "arrival": wall_time(m.arrival),
        "first_scheduled": wall_time(m.first_scheduled),
        "finished": wall_time(m.finished),
    }
