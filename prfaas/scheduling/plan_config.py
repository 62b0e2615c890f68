"""Planner configs: profiles, workload and the deployments to compare (see configs/case_study.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from prfaas.config_file import read_mapping
from prfaas.scheduling.lengths import Empirical, LengthDist, TruncatedLogNormal
from prfaas.scheduling.planner import Fleet
from prfaas.scheduling.profile import HardwareProfile, profiles_from_mapping

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "case_study.yaml"
SYSTEMS = ("prfaas", "homogeneous_pd", "naive_heterogeneous")


@dataclass(frozen=True)
class SystemSpec:
    """One deployment: a fleet plus how to search it (``n_pd_total``: split searched; None: fixed)."""

    name: str
    fleet: Fleet
    n_pd_total: int | None


@dataclass(frozen=True)
class PlanConfig:
    profiles: dict[str, HardwareProfile]
    dist: LengthDist
    output_len: float
    link_gbps: float
    systems: dict[str, SystemSpec]
    threshold_step: float | None = None
    link_sweep_gbps: tuple[float, ...] = ()
    paper: dict = field(default_factory=dict)
    fleet_egress: dict = field(default_factory=dict)
    source: str = ""

    def with_link(self, gbps: float) -> PlanConfig:
        """Same config with another cross-cluster link bandwidth."""
        systems = {
            k: replace(s, fleet=replace(s.fleet, link_gbps=float(gbps)))
            for k, s in self.systems.items()
        }
        return replace(self, link_gbps=float(gbps), systems=systems)


def make_dist(spec: dict, base: Path | None = None) -> LengthDist:
    """A length distribution from ``{kind: lognormal, mu, sigma, lo, hi}`` or
    ``{kind: trace, path, block_tokens?, prefix_cache?}`` (relative paths: against ``base``, then
    the working directory)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError("workload.length needs a mapping with 'kind'")
    kind = spec["kind"]
    if kind == "lognormal":
        try:
            return TruncatedLogNormal(
                float(spec["mu"]), float(spec["sigma"]), float(spec["lo"]), float(spec["hi"])
            )
        except KeyError as e:
            raise ValueError(f"lognormal length needs mu, sigma, lo, hi; missing {e}") from None
    if kind == "trace":
        if "path" not in spec:
            raise ValueError("trace length needs 'path'")
        p = Path(spec["path"])
        if not p.is_absolute() and base is not None and (base / p).exists():
            p = base / p
        return Empirical.from_trace(
            p, int(spec.get("block_tokens", 512)), bool(spec.get("prefix_cache", True))
        )
    if kind == "empirical":
        return Empirical(spec["samples"])
    raise ValueError(f"unknown length kind {kind!r} (lognormal, trace, empirical)")


def _profile(profiles: dict[str, HardwareProfile], name: str, where: str) -> HardwareProfile:
    if name not in profiles:
        raise ValueError(f"{where}: unknown profile {name!r} (have {sorted(profiles)})")
    return profiles[name]


def _system(name: str, body: dict, profiles, output_len: float, link: float) -> SystemSpec:
    if not isinstance(body, dict) or "pd" not in body or "decode" not in body:
        raise ValueError(f"system {name!r} needs 'pd' and 'decode'")
    pf = body.get("prfaas")
    prfaas = _profile(profiles, pf["profile"], name) if pf else None
    n_prfaas = int(pf.get("instances", 0)) if pf else 0
    pd = _profile(profiles, body["pd"]["profile"], name)
    n_pd = int(body["pd"].get("instances", 0))
    decode = _profile(profiles, body["decode"], name)
    if n_pd == 0:  # no PD-P: decode instances fixed by decode_instances, no split to search
        n_d = int(body.get("decode_instances", 0))
        if n_d < 1:
            raise ValueError(f"system {name!r}: pd has 0 instances, give decode_instances >= 1")
        fleet = Fleet(prfaas, pd, decode, n_prfaas, 0, n_d, link, output_len)
        return SystemSpec(name, fleet, None)
    if n_pd < 1:
        raise ValueError(f"system {name!r}: pd instances must be >= 0")
    fleet = Fleet(prfaas, pd, decode, n_prfaas, n_pd // 2, n_pd - n_pd // 2, link, output_len)
    return SystemSpec(name, fleet, n_pd)


def load_plan_config(path: str | Path | None = None) -> PlanConfig:
    """Parse a planner config (default: the shipped case study)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    data = read_mapping(p, "planner config")
    for key in ("profiles", "workload", "systems"):
        if key not in data:
            raise ValueError(f"{p}: missing section {key!r}")
    profiles = profiles_from_mapping({"profiles": data["profiles"]})
    wl = data["workload"]
    if "length" not in wl or "output_len" not in wl:
        raise ValueError(f"{p}: workload needs 'length' and 'output_len'")
    dist = make_dist(wl["length"], p.parent)
    output_len = float(wl["output_len"])
    link = float(data.get("link_gbps", 100))
    systems = {
        name: _system(name, body, profiles, output_len, link)
        for name, body in data["systems"].items()
    }
    step = data.get("threshold_step")
    return PlanConfig(
        profiles=profiles,
        dist=dist,
        output_len=output_len,
        link_gbps=link,
        systems=systems,
        threshold_step=float(step) if step is not None else None,
        link_sweep_gbps=tuple(float(x) for x in data.get("link_sweep_gbps") or ()),
        paper=dict(data.get("paper") or {}),
        fleet_egress=dict(data.get("fleet_egress") or {}),
        source=str(p),
    )
