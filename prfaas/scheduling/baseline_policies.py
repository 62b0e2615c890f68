"""The paper's two baselines: homogeneous PD (everything in the PD cluster) and naive heterogeneous
(every prefill in the PrfaaS cluster, no length routing)."""

from __future__ import annotations

from prfaas.scheduling.policy_base import Policy, pick_decode, pick_prefill
from prfaas.scheduling.types import RequestInfo, RouteDecision, SystemState


class HomogeneousPD(Policy):
    """Everything in one PD cluster: PD-P prefills, PD-D decodes, KV over RDMA."""

    name = "homogeneous-pd"

    def __init__(self, pd: str = "pd", affinity_slack_s: float = 1.0) -> None:
        self.pd = pd
        self.affinity_slack_s = affinity_slack_s

    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:
        cs = state.clusters[self.pd]
        cached = state.cached_prefix(self.pd, req)
        i = pick_prefill(cs, req, state.now, self.affinity_slack_s, cached)
        d = pick_decode(cs)
        return RouteDecision(self.pd, i, self.pd, d, req.prompt_len - cached, cached, reason="pd")


class NaiveHeterogeneous(Policy):
    """All prefill in the PrfaaS cluster, all decode in the PD cluster; no length routing."""

    name = "naive-heterogeneous"

    def __init__(
        self, prfaas: str = "prfaas", pd: str = "pd", affinity_slack_s: float = 1.0
    ) -> None:
        self.prfaas, self.pd = prfaas, pd
        self.affinity_slack_s = affinity_slack_s

    def decide(self, req: RequestInfo, state: SystemState) -> RouteDecision:
        cached = state.cached_prefix(self.prfaas, req)
        i = pick_prefill(state.clusters[self.prfaas], req, state.now, self.affinity_slack_s, cached)
        d = pick_decode(state.clusters[self.pd])
        return RouteDecision(
            self.prfaas, i, self.pd, d, req.prompt_len - cached, cached, reason="all-prfaas"
        )
