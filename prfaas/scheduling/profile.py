"""Per-hardware model profiles: KV size, prefill latency and decode capacity vs length.

A :class:`HardwareProfile` holds profiled points of one model on one hardware kind (one instance =
``gpus_per_instance`` GPUs) and interpolates between and beyond them:

* ``s_kv(l)``: piecewise linear in ``l``, extrapolated linearly from the end segments (the KV of a
  hybrid model is affine in length: a fixed linear-attention state plus per-token full-attention KV).
* ``t_prefill(l)``: ``interp`` picks the scheme. ``"loglog_pchip"`` (default) is a monotone cubic
  through the points in log-log space (power law between points, smooth) extrapolated as the end
  segments' power laws; ``"linear"`` is piecewise linear in ``l`` with linear extrapolation;
  ``"quadratic"`` is the least-squares fit ``a + b·l + c·l²`` (not exact at the points).
* the hand-off's node costs, when profiled (``prfaas profile`` measures them): ``export_time(bytes)``
  on the prefill node (KV out of the cache, ``export_gbps``) and ``import_time(bytes)`` on the decode
  node (``import_fixed_s + bytes / import_gbps``: the import's checks and its write into the cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.interpolate import PchipInterpolator

from prfaas.config_file import read_mapping

MIB = 1024 * 1024
INTERPOLATIONS = ("loglog_pchip", "linear", "quadratic")
_FIELDS = (
    "name",
    "gpus_per_instance",
    "lengths",
    "kv_bytes",
    "prefill_s",
    "bs_max",
    "t_decode_s",
    "decode_batch",
    "decode_step_s",
    "gpu_price_per_hour",
    "interp",
    "export_gbps",
    "import_gbps",
    "import_fixed_s",
)


_HANDOFF = ("export_gbps", "import_gbps", "import_fixed_s")


def _as_out(x: Any, y: np.ndarray) -> float | np.ndarray:
    return float(y) if np.ndim(x) == 0 else y


def _lin_extrap(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation with linear extrapolation from the end segments."""
    y = np.interp(x, xs, ys)
    lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    y = np.where(x < xs[0], ys[0] + (x - xs[0]) * lo_slope, y)
    return np.where(x > xs[-1], ys[-1] + (x - xs[-1]) * hi_slope, y)


@dataclass(frozen=True)
class HardwareProfile:
    """One model served on one hardware kind, per instance (one instance = gpus_per_instance GPUs)."""

    name: str
    gpus_per_instance: int
    lengths: tuple[int, ...]
    kv_bytes: tuple[float, ...]
    prefill_s: tuple[float, ...]
    bs_max: int | None = None
    t_decode_s: float | None = None
    decode_batch: tuple[int, ...] = ()
    decode_step_s: tuple[float, ...] = ()
    gpu_price_per_hour: float | None = None
    interp: str = "loglog_pchip"
    # the hand-off's costs on the nodes (None: not measured, counted as free): the prefill node
    # stages a request's KV out of its cache at ``export_gbps`` (its engine waits meanwhile); the
    # decode node checks and writes an imported KV in ``import_fixed_s + bytes / import_gbps``
    export_gbps: float | None = None
    import_gbps: float | None = None
    import_fixed_s: float | None = None
    _pchip: Any = field(default=None, init=False, repr=False, compare=False)
    _quad: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("lengths", "kv_bytes", "prefill_s", "decode_batch", "decode_step_s"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.name:
            raise ValueError("profile needs a name")
        if int(self.gpus_per_instance) < 1:
            raise ValueError(f"{self.name}: gpus_per_instance must be >= 1")
        n = len(self.lengths)
        if n < 2:
            raise ValueError(f"{self.name}: need at least 2 profiled lengths, got {n}")
        if len(self.kv_bytes) != n or len(self.prefill_s) != n:
            raise ValueError(
                f"{self.name}: lengths, kv_bytes and prefill_s must have equal sizes "
                f"({n}, {len(self.kv_bytes)}, {len(self.prefill_s)})"
            )
        ls = np.asarray(self.lengths, dtype=float)
        if ls[0] <= 0 or np.any(np.diff(ls) <= 0):
            raise ValueError(f"{self.name}: lengths must be positive and strictly increasing")
        if min(self.kv_bytes) <= 0 or min(self.prefill_s) <= 0:
            raise ValueError(f"{self.name}: kv_bytes and prefill_s must be positive")
        if self.interp not in INTERPOLATIONS:
            raise ValueError(
                f"{self.name}: interp must be one of {INTERPOLATIONS}, got {self.interp!r}"
            )
        if self.interp == "quadratic" and n < 3:
            raise ValueError(f"{self.name}: quadratic interp needs at least 3 points")
        if self.bs_max is not None and int(self.bs_max) < 1:
            raise ValueError(f"{self.name}: bs_max must be >= 1")
        if self.t_decode_s is not None and self.t_decode_s <= 0:
            raise ValueError(f"{self.name}: t_decode_s must be positive")
        if len(self.decode_batch) != len(self.decode_step_s):
            raise ValueError(f"{self.name}: decode_batch and decode_step_s must have equal sizes")
        if self.decode_batch and (
            self.decode_batch[0] < 1
            or np.any(np.diff(self.decode_batch) <= 0)
            or min(self.decode_step_s) <= 0
        ):
            raise ValueError(
                f"{self.name}: decode_batch must be increasing from >= 1 with positive step times"
            )
        if self.gpu_price_per_hour is not None and self.gpu_price_per_hour < 0:
            raise ValueError(f"{self.name}: gpu_price_per_hour must be >= 0")
        for k in ("export_gbps", "import_gbps"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ValueError(f"{self.name}: {k} must be > 0 (or left out)")
        if self.import_fixed_s is not None and self.import_fixed_s < 0:
            raise ValueError(f"{self.name}: import_fixed_s must be >= 0")
        ts = np.asarray(self.prefill_s, dtype=float)
        object.__setattr__(self, "_pchip", PchipInterpolator(np.log(ls), np.log(ts)))
        if n >= 3:
            object.__setattr__(self, "_quad", np.polyfit(ls, ts, 2))

    # ---- prefill side -------------------------------------------------------------------------
    def s_kv(self, l: float | np.ndarray) -> float | np.ndarray:  # noqa: E741
        """KV bytes (full-attention KV + linear-attention state) produced by prefilling l tokens."""
        x = np.asarray(l, dtype=float)
        if np.any(x < 0):
            raise ValueError("length must be >= 0")
        ys = _lin_extrap(x, np.asarray(self.lengths, float), np.asarray(self.kv_bytes, float))
        return _as_out(l, np.maximum(ys, 0.0))

    def t_prefill(self, l: float | np.ndarray) -> float | np.ndarray:  # noqa: E741
        """Seconds one instance takes to prefill l uncached tokens."""
        x = np.asarray(l, dtype=float)
        if np.any(x <= 0) or np.any(~np.isfinite(x)):
            raise ValueError("prefill length must be positive and finite")
        ls = np.asarray(self.lengths, float)
        ts = np.asarray(self.prefill_s, float)
        if self.interp == "linear":
            y = _lin_extrap(x, ls, ts)
            y = np.maximum(y, ts.min() * 1e-3)
        elif self.interp == "quadratic":
            y = np.maximum(np.polyval(self._quad, x), ts.min() * 1e-3)
        else:
            lx, lls, lts = np.log(x), np.log(ls), np.log(ts)
            inner = self._pchip(np.clip(lx, lls[0], lls[-1]))
            lo_k = (lts[1] - lts[0]) / (lls[1] - lls[0])
            hi_k = (lts[-1] - lts[-2]) / (lls[-1] - lls[-2])
            ly = np.where(lx < lls[0], lts[0] + (lx - lls[0]) * lo_k, inner)
            ly = np.where(lx > lls[-1], lts[-1] + (lx - lls[-1]) * hi_k, ly)
            y = np.exp(ly)
        return _as_out(l, y)

    def phi_kv(self, l: float | np.ndarray) -> float | np.ndarray:  # noqa: E741
        """KV throughput in bytes/s: s_kv(l) / t_prefill(l)."""
        x = np.asarray(l, dtype=float)
        return _as_out(l, np.asarray(self.s_kv(x)) / np.asarray(self.t_prefill(x)))

    # ---- decode side --------------------------------------------------------------------------
    def decode_step_time(self, batch: int) -> float:
        """Seconds per decode step at this batch size.

        With a measured table: linear interpolation, end-segment extrapolation. Without one: the
        step time is ``t_decode_s`` up to ``bs_max`` and grows linearly beyond (throughput-bound).
        """
        if batch < 1:
            raise ValueError(f"decode batch must be >= 1, got {batch}")
        if self.decode_batch:
            if len(self.decode_batch) == 1:
                return float(self.decode_step_s[0])
            y = _lin_extrap(
                np.asarray(float(batch)),
                np.asarray(self.decode_batch, float),
                np.asarray(self.decode_step_s, float),
            )
            return float(max(y, min(self.decode_step_s) * 1e-3))
        if self.bs_max is None or self.t_decode_s is None:
            raise ValueError(f"{self.name}: no decode profile (bs_max/t_decode_s or a table)")
        return float(self.t_decode_s * max(1.0, batch / self.bs_max))

    def decode_rate(self, output_len: float) -> float:
        """Requests/s one instance decodes: bs_max / (t_decode_s * output_len)."""
        if output_len <= 0:
            raise ValueError(f"output_len must be positive, got {output_len}")
        if self.bs_max is None or self.t_decode_s is None:
            raise ValueError(f"{self.name}: decode capacity needs bs_max and t_decode_s")
        return self.bs_max / (self.t_decode_s * output_len)

    def with_decode_slo(self, tpot_slo_s: float) -> HardwareProfile:
        """Copy with bs_max / t_decode_s set from the decode table: the largest measured batch whose
        step time meets the TPOT SLO (seconds per output token)."""
        if tpot_slo_s <= 0:
            raise ValueError("tpot_slo_s must be positive")
        if not self.decode_batch:
            raise ValueError(f"{self.name}: no decode table (decode_batch/decode_step_s)")
        ok = [
            (b, t)
            for b, t in zip(self.decode_batch, self.decode_step_s, strict=True)
            if t <= tpot_slo_s
        ]
        if not ok:
            raise ValueError(f"{self.name}: no measured batch meets TPOT {tpot_slo_s} s")
        b, t = max(ok)
        d = self.to_dict()
        d.update(bs_max=int(b), t_decode_s=float(t))
        return HardwareProfile.from_dict(d)

    # ---- hand-off -----------------------------------------------------------------------------
    def export_time(self, nbytes: float) -> float:
        """Seconds the prefill node stages ``nbytes`` of KV out of its cache (0 if not profiled)."""
        return nbytes * 8 / (self.export_gbps * 1e9) if self.export_gbps else 0.0

    def import_time(self, nbytes: float) -> float:
        """Seconds the decode node checks and writes ``nbytes`` of imported KV (0 if not profiled)."""
        per_byte = nbytes * 8 / (self.import_gbps * 1e9) if self.import_gbps else 0.0
        return (self.import_fixed_s or 0.0) + per_byte

    @property
    def has_decode(self) -> bool:
        return self.bs_max is not None and self.t_decode_s is not None

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _FIELDS}
        for k in ("lengths", "kv_bytes", "prefill_s", "decode_batch", "decode_step_s"):
            d[k] = list(d[k])
        for k in _HANDOFF:  # not measured: left out (older files have none)
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        """Build from a mapping; ``kv_mib`` may replace ``kv_bytes``, and ``tpot_slo_s`` with a
        decode table derives ``bs_max``/``t_decode_s``."""
        if not isinstance(d, dict):
            raise ValueError(f"profile must be a mapping, got {type(d).__name__}")
        d = dict(d)
        if "kv_mib" in d:
            if "kv_bytes" in d:
                raise ValueError("give kv_bytes or kv_mib, not both")
            d["kv_bytes"] = [float(v) * MIB for v in d.pop("kv_mib")]
        slo = d.pop("tpot_slo_s", None)
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown profile keys: {sorted(unknown)}")
        missing = {"name", "gpus_per_instance", "lengths", "kv_bytes", "prefill_s"} - set(d)
        if missing:
            raise ValueError(f"profile {d.get('name', '?')!r} misses keys: {sorted(missing)}")
        d["lengths"] = tuple(int(v) for v in d["lengths"])
        d["kv_bytes"] = tuple(float(v) for v in d["kv_bytes"])
        d["prefill_s"] = tuple(float(v) for v in d["prefill_s"])
        d["decode_batch"] = tuple(int(v) for v in d.get("decode_batch") or ())
        d["decode_step_s"] = tuple(float(v) for v in d.get("decode_step_s") or ())
        d["gpus_per_instance"] = int(d["gpus_per_instance"])
        if d.get("bs_max") is not None:
            d["bs_max"] = int(d["bs_max"])
        for k in ("t_decode_s", "gpu_price_per_hour", *_HANDOFF):
            if d.get(k) is not None:
                d[k] = float(d[k])
        prof = cls(**d)
        if slo is not None:
            prof = prof.with_decode_slo(float(slo))
        return prof


@dataclass(frozen=True)
class HandoffTiming:
    """One request's hand-off costs on the nodes (best of the repetitions, seconds)."""

    length: int
    nbytes: int  # KV exported (MLA latents of length - 1 tokens + the KDA/conv states)
    export_s: float  # out of the prefill engine's cache into host memory (the sender's input)
    import_s: float  # the decode engine's checks and write into its cache
    first_step_s: float  # the decode engine's first step after it (last prompt token, a sample)


def handoff_costs(timings: Sequence[HandoffTiming]) -> dict[str, float]:
    """The profile's hand-off fields from timings at two or more lengths: ``export_gbps`` the rate at
    the largest; ``import_fixed_s`` / ``import_gbps`` the line through the smallest and the largest
    (no fixed part, the largest's rate, when the line does not rise from a positive intercept)."""
    lo, hi = min(timings, key=lambda h: h.nbytes), max(timings, key=lambda h: h.nbytes)
    out = {"export_gbps": hi.nbytes * 8 / 1e9 / hi.export_s}
    slope = (hi.import_s - lo.import_s) / (hi.nbytes - lo.nbytes) if hi.nbytes > lo.nbytes else 0
    fixed = lo.import_s - slope * lo.nbytes
    if slope > 0 and fixed >= 0:
        out.update(import_gbps=8 / 1e9 / slope, import_fixed_s=fixed)
    else:
        out.update(import_gbps=hi.nbytes * 8 / 1e9 / hi.import_s, import_fixed_s=0.0)
    return out


def profiles_from_mapping(data: dict) -> dict[str, HardwareProfile]:
    """Profiles from ``{"profiles": {name: {...}}}`` or ``{name: {...}}``; name defaults to key."""
    section = data.get("profiles", data)
    if not isinstance(section, dict) or not section:
        raise ValueError("no profiles found")
    out: dict[str, HardwareProfile] = {}
    for key, body in section.items():
        if not isinstance(body, dict):
            raise ValueError(f"profile {key!r} must be a mapping")
        body = dict(body)
        body.setdefault("name", key)
        out[str(key)] = HardwareProfile.from_dict(body)
    return out


def load_profiles(path: str | Path) -> dict[str, HardwareProfile]:
    """Load several profiles from a YAML or JSON file (see :func:`profiles_from_mapping`)."""
    return profiles_from_mapping(read_mapping(path, "profile file"))


def gbps(bytes_per_s: float) -> float:
    """Bytes/s to Gbit/s (decimal)."""
    return bytes_per_s * 8 / 1e9
