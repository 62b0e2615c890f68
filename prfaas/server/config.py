"""A deployment in one file: clusters, their nodes and roles, links between clusters, model, policy,
secret (``prfaas/configs/deploy_*.yaml``).

Imports no torch: the gateway reads it.  ``validate()`` checks everything, and for the engine
settings, the secret and the pool addresses it asks the packages that own them (engine, transfer's
auth, cache: these import torch); ``validate(full=False)`` skips those three (the gateway process,
which never builds an engine or a sender: ``prfaas router``).
``engine_limits()`` is the gateway's torch-free view of the engine settings it routes by.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prfaas.config_file import build_dataclass, read_mapping

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.engine import EngineConfig
    from prfaas.transfer.link import LinkShaperSpec

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "deploy_local.yaml"
NODE_ROLES = ("prefill", "decode")
CLUSTER_KINDS = ("prfaas", "pd")
POLICIES = ("prfaas", "homogeneous", "naive")
ROUTER_CACHE_MODES = ("oblivious", "scarce", "abundant", "auto")  # abundant/auto: prefix_pool on


@dataclass
class NodeConfig:
    name: str
    role: str  # "prefill" | "decode"
    host: str = "127.0.0.1"
    http_port: int = 0
    kv_port: int = 0
    device: str = ""  # this node's engine device ("cuda:1", "cpu", ...); "" = the deployment's
    # ranks of this node's engine (its GPUs: device, device+1, ...); 0 = the deployment's
    # engine.tensor_parallel_size (default 1)
    tensor_parallel_size: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@dataclass
class ClusterConfig:
    name: str
    kind: str  # "prfaas" (prefill only) | "pd" (PD-P and PD-D nodes)
    nodes: list[NodeConfig]
    # the cluster's Mooncake Store (prefix pool): master host:port and HTTP metadata URL; empty
    # with prefix_pool on: `prfaas up` starts a mooncake_master for the cluster and fills them in
    pool_master: str = ""
    pool_metadata: str = ""


@dataclass
class LinkConfig:
    src: str
    dst: str
    gbps: float | None = None
    rtt_ms: float = 0.0
    schedule: list[tuple[float, float]] = field(default_factory=list)  # (t_s, gbps) segments

    def spec(self) -> LinkShaperSpec:
        from prfaas.transfer.link import LinkShaperSpec

        return LinkShaperSpec(
            self.gbps, self.rtt_ms, tuple((float(t), float(g)) for t, g in self.schedule)
        )

    @property
    def nominal_gbps(self) -> float:
        return float(self.gbps if self.gbps is not None else self.schedule[0][1])


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "prfaas"
    # prfaas: the paper's whole scheduler by default (docs/simulator.md): the planner's t over the
    # profile and the expected lengths, re-searched on the observed ones and on link/queue signals,
    # and live PD role rebalancing. A threshold fixes t (no short-term search).
    threshold: float | None = None
    rebalance: bool = True
    profile: str = ""  # hardware profile file (`prfaas profile --out`); "": the packaged one
    output_len: float = 128.0  # expected output tokens until requests have finished
    prior: dict[str, float] | None = (
        None  # expected prompt lengths {mu, sigma, lo, hi} (log-normal)
    )
    adaptive_opts: dict[str, Any] = field(default_factory=dict)  # ShortTermAdaptation settings
    rebalance_opts: dict[str, Any] = field(default_factory=dict)  # LongTermRebalancing settings
    cache_mode: str = "scarce"
    max_inflight: int = 64
    prefill_timeout_s: float = 60.0
    # a decode node's answer to a decode open (its headers and its ``ready`` line), seconds: one
    # that does not answer in time is taken for down and the request tries another decode node
    decode_open_timeout_s: float = 30.0
    poll_interval_s: float = 0.5


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings the gateway routes by, read from the deployment's ``engine`` section
    without the engine (the defaults are ``EngineConfig``'s; a test keeps them equal)."""

    max_num_seqs: int = 32
    max_model_len: int = 4096
    block_size: int = 16
    checkpoint_interval: int = 64
    num_checkpoints: int = 64
    enable_prefix_cache: bool = True


@dataclass
class DeployConfig:
    model: str = "tiny"
    device: str = "cpu"
    secret: str = ""
    transfer_backend: str = "tcp"
    engine: dict[str, Any] = field(default_factory=dict)
    clusters: list[ClusterConfig] = field(default_factory=list)
    links: list[LinkConfig] = field(default_factory=list)
    router: RouterConfig = field(default_factory=RouterConfig)
    prefix_pool: bool = False  # second cache tier on each cluster's Mooncake Store + KV manager
    prefix_pool_segment_mb: int = 256  # host DRAM each node contributes to its cluster's pool
    prefix_pool_retry_s: float = 5.0  # back-off after a store failure (recompute meanwhile)
    config_dir: str = ""  # the folder of the file it was read from (relative paths start there)

    # ---- look-ups ---------------------------------------------------------------------------
    def node(self, name: str) -> tuple[ClusterConfig, NodeConfig]:
        for c in self.clusters:
            for n in c.nodes:
                if n.name == name:
                    return c, n
        names = [n.name for c in self.clusters for n in c.nodes]
        raise ValueError(f"no node {name!r} in the deployment (nodes: {names})")

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        raise ValueError(f"no cluster {name!r} in the deployment")

    def link(self, src: str, dst: str) -> LinkConfig | None:
        for lk in self.links:
            if (lk.src, lk.dst) == (src, dst):
                return lk
        return None

    def profile_path(self) -> Path | None:
        """The hardware profile the gateway plans with: ``router.profile`` (relative paths from the
        config file's folder, ``config_dir``), else the packaged ``profile_<model>_<device>.yaml``
        if there is one."""
        r = self.router.profile
        if r:
            p = Path(r)
            return p if p.is_absolute() else Path(self.config_dir or ".") / p
        p = DEFAULT_CONFIG.parent / f"profile_{Path(self.model).name}_{self.device}.yaml"
        return p if p.is_file() else None

    def engine_limits(self) -> EngineLimits:
        """The engine settings the gateway needs (no torch; the nodes' engines use the same)."""
        names = {f.name for f in dataclasses.fields(EngineLimits)}
        return EngineLimits(**{k: v for k, v in self.engine.items() if k in names})

    def engine_config(
        self, role: str, device: str | None = None, tensor_parallel_size: int = 0
    ) -> EngineConfig:
        """The engine settings of a node of ``role``; ``device`` and ``tensor_parallel_size``
        (a node's own, when set) override the deployment's."""
        from prfaas.engine import EngineConfig

        kw = dict(self.engine)
        if tensor_parallel_size:
            kw["tensor_parallel_size"] = tensor_parallel_size
        return EngineConfig(model=self.model, role=role, device=device or self.device, **kw)

    def node_tp(self, n: NodeConfig) -> int:
        """The tensor-parallel size node ``n`` runs with."""
        return n.tensor_parallel_size or int(self.engine.get("tensor_parallel_size", 1))

    def node_engine_config(self, name: str) -> EngineConfig:
        """The engine settings of node ``name`` (its role, and its device if it names one)."""
        _, n = self.node(name)
        return self.engine_config(n.role, n.device or None, n.tensor_parallel_size)

    @property
    def prfaas_cluster(self) -> str | None:
        return next((c.name for c in self.clusters if c.kind == "prfaas"), None)

    @property
    def pd_cluster(self) -> str:
        return next(c.name for c in self.clusters if c.kind == "pd")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation -------------------------------------------------------------------------
    def validate(self, full: bool = True) -> DeployConfig:
        """Check the deployment (ValueError naming what is wrong); ``full=False`` skips the checks
        that need the engine, transfer and cache packages (see the module docstring)."""
        if full:
            from prfaas.transfer.auth import check_secret

            check_secret(self.secret)
        if self.transfer_backend not in ("tcp", "mooncake"):
            raise ValueError(
                f"transfer_backend must be tcp or mooncake, got {self.transfer_backend!r}"
            )
        names: set[str] = set()
        for c in self.clusters:
            if c.kind not in CLUSTER_KINDS:
                raise ValueError(f"cluster {c.name!r}: kind must be one of {CLUSTER_KINDS}")
            if not c.nodes:
                raise ValueError(f"cluster {c.name!r} has no nodes")
            for n in c.nodes:
                if n.role not in NODE_ROLES:
                    raise ValueError(f"node {n.name!r}: role must be one of {NODE_ROLES}")
                if c.kind == "prfaas" and n.role != "prefill":
                    raise ValueError(f"node {n.name!r}: a PrfaaS cluster holds prefill nodes only")
                if n.name in names:
                    raise ValueError(f"node name {n.name!r} used twice")
                names.add(n.name)
                if n.tensor_parallel_size < 0:
                    raise ValueError(f"node {n.name!r}: tensor_parallel_size must be >= 1")
                if self.node_tp(n) > 1 and self.prefix_pool:
                    raise ValueError(
                        f"node {n.name!r}: tensor_parallel_size > 1 does not support "
                        "prefix_pool (the second cache tier) yet"
                    )
                if self.node_tp(n) > 1 and full:
                    from prfaas.model.config import resolve_config
                    from prfaas.model.tp.shard import check_tp

                    why = check_tp(resolve_config(self.model), self.node_tp(n))
                    if why:
                        raise ValueError(f"node {n.name!r}: {why}")
                if n.device and full:
                    try:
                        self.engine_config(n.role, n.device).resolved_device()
                    except RuntimeError as e:
                        raise ValueError(f"node {n.name!r}: bad device {n.device!r}: {e}") from None
        pds = [c for c in self.clusters if c.kind == "pd"]
        if len(pds) != 1:
            raise ValueError(f"a deployment needs exactly one PD cluster, got {len(pds)}")
        roles = {n.role for n in pds[0].nodes}
        if roles != {"prefill", "decode"}:
            raise ValueError("the PD cluster needs at least one prefill and one decode node")
        if len([c for c in self.clusters if c.kind == "prfaas"]) > 1:
            raise ValueError("at most one PrfaaS cluster is supported")
        cnames = {c.name for c in self.clusters}
        if len(cnames) != len(self.clusters):
            raise ValueError("cluster names must be unique")
        for lk in self.links:
            if lk.src not in cnames or lk.dst not in cnames:
                raise ValueError(f"link {lk.src}->{lk.dst} names an unknown cluster")
            lk.spec().build()  # ValueError on a bad bandwidth / schedule / rtt (no torch)
        r = self.router
        if r.policy not in POLICIES:
            raise ValueError(f"router.policy must be one of {POLICIES}, got {r.policy!r}")
        if r.cache_mode not in ROUTER_CACHE_MODES:
            raise ValueError(f"router.cache_mode must be one of {ROUTER_CACHE_MODES}")
        if r.cache_mode in ("abundant", "auto") and not self.prefix_pool:
            raise ValueError(
                f"router.cache_mode {r.cache_mode!r} copies prefixes between clusters: "
                "it needs prefix_pool: true"
            )
        if self.prefix_pool_segment_mb < 16 or self.prefix_pool_retry_s < 0:
            raise ValueError("need prefix_pool_segment_mb >= 16 and prefix_pool_retry_s >= 0")
        for c in self.clusters:
            if bool(c.pool_master) != bool(c.pool_metadata):
                raise ValueError(f"cluster {c.name!r}: set both pool_master and pool_metadata")
            if c.pool_master and full:
                from prfaas.cache.pool_mooncake import PoolAddress

                PoolAddress(c.pool_master, c.pool_metadata)  # ValueError if malformed
        if r.policy in ("prfaas", "naive") and self.prfaas_cluster is None:
            raise ValueError(f"policy {r.policy!r} needs a PrfaaS cluster")
        bad_t = r.threshold is not None and not r.threshold >= 0
        bad_timeout = not (r.prefill_timeout_s > 0 and r.decode_open_timeout_s > 0)
        if r.max_inflight < 1 or bad_t or bad_timeout or not r.output_len > 0:
            raise ValueError(
                "router: need max_inflight >= 1, threshold >= 0 (or none), prefill_timeout_s > 0, "
                "decode_open_timeout_s > 0, output_len > 0"
            )
        if r.prior is not None and set(r.prior) != {"mu", "sigma", "lo", "hi"}:
            raise ValueError("router.prior: give mu, sigma, lo and hi (a truncated log-normal)")
        if not isinstance(self.engine, dict):
            raise ValueError("engine: expected a mapping")
        if full:
            self.engine_config("decode")  # ValueError on bad engine settings
        return self


def parse_deploy_config(data: dict[str, Any], full: bool = True) -> DeployConfig:
    """Build and validate a deployment from a parsed YAML/JSON mapping (ValueError if bad;
    ``full``: see ``DeployConfig.validate``)."""
    if not isinstance(data, dict):
        raise ValueError("a deployment config must be a mapping")
    d = dict(data)
    clusters = []
    for i, c in enumerate(d.pop("clusters", []) or []):
        c = dict(c) if isinstance(c, dict) else c
        if not isinstance(c, dict):
            raise ValueError(f"clusters[{i}]: expected a mapping")
        nodes = [
            build_dataclass(NodeConfig, n, f"clusters[{i}].nodes[{j}]")
            for j, n in enumerate(c.pop("nodes", []) or [])
        ]
        clusters.append(build_dataclass(ClusterConfig, {**c, "nodes": nodes}, f"clusters[{i}]"))
    links = [
        build_dataclass(LinkConfig, lk, f"links[{i}]")
        for i, lk in enumerate(d.pop("links", []) or [])
    ]
    router = build_dataclass(RouterConfig, d.pop("router", {}) or {}, "router")
    engine = d.pop("engine", {}) or {}
    cfg = build_dataclass(DeployConfig, {**d, "engine": engine}, "deployment")
    cfg.clusters, cfg.links, cfg.router = clusters, links, router
    return cfg.validate(full)


def load_deploy_config(path: str | Path | None = None, full: bool = True) -> DeployConfig:
    """Read a deployment file (default: the packaged ``deploy_local.yaml``)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = parse_deploy_config(read_mapping(p, "deployment config"), full)
    if not cfg.config_dir:
        cfg.config_dir = str(p.resolve().parent)
    return cfg
