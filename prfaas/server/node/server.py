"""A node: one engine, one role (prefill or decode), one cluster; a control plane over HTTP
(``prfaas.server.node.routes``, messages in ``prfaas.server.protocol``) and the KV cache over the
transfer layer.

``NodeServer(cfg, name)`` builds the engine, its thread (``EngineWorker``) and the role's parts:
``PrefillSide`` (KV out: prefill, export, send; fault injection on links), ``DecodeSide`` (KV in:
expectations, imports, token streams) and ``PrefixPool`` (the second cache tier, cache events,
prefix writes and copies); ``start()`` starts the engine thread and, on a decode node, the KV
receiver; ``state()`` is what the gateway polls.
"""

from __future__ import annotations

import os
from typing import Any

from prfaas.engine import LLMEngine
from prfaas.engine.sampling import prompt_logprobs
from prfaas.server.auth import check_node_secret
from prfaas.server.config import DeployConfig
from prfaas.server.node.decode import DecodeSide
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.node.kv_layout import layout_for_engine
from prfaas.server.node.prefill import PrefillSide
from prfaas.server.node.prefix_pool import PrefixPool
from prfaas.server.node.routes import build_node_app
from prfaas.server.protocol import (
    NodeCounters,
    NodeState,
    PromptScore,
    PromptScoreResult,
    TokenLogprobMsg,
)


class NodeServer:
    """Everything of one node process (build with ``NodeServer(cfg, name)``, then ``start()``)."""

    def __init__(self, cfg: DeployConfig, node_name: str, engine: LLMEngine | None = None) -> None:
        self.cfg = cfg
        self.cluster, self.node = cfg.node(node_name)
        check_node_secret(self.node.host, cfg.secret)
        self.role = self.node.role
        _use_device(cfg.node_engine_config(node_name).resolved_device())
        self.engine = engine or LLMEngine(cfg.node_engine_config(node_name))
        self.worker = EngineWorker(self.engine)
        self.layout = layout_for_engine(self.engine)
        self.counters = NodeCounters()
        self.prefill = PrefillSide(
            cfg, self.cluster, self.node, self.worker, self.layout, self.counters
        )
        self.decode = DecodeSide(cfg, self.node, self.worker, self.layout, self.counters)
        self.pool = PrefixPool(cfg, self.cluster, self.node, self.worker)
        self.app = build_node_app(self)

    @property
    def kv_port(self) -> int:
        return self.decode.kv_port

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> NodeServer:
        self.worker.start()
        if self.role == "decode":
            self.decode.start()
        return self

    def close(self) -> None:
        self.prefill.close()
        self.decode.close()
        self.worker.stop()
        self.pool.close()
        self.engine.close()  # a tensor-parallel engine's ranks

    # ---- role switch ------------------------------------------------------------------------
    async def switch_role(self, role: str) -> NodeState:
        """Serve in ``role`` from now on, without a restart: the engine's role changes in its own
        thread once it holds no request; a node turning decode starts its KV receiver.  ValueError
        when the node still has work (the gateway drains it first) or is not a PD node."""
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        if role == self.role:
            return self.state()
        if self.cluster.kind != "pd":
            raise ValueError(
                f"{self.node.name} is in a {self.cluster.kind} cluster: no role switch"
            )
        if self.decode.expect or self.prefill.active:
            raise ValueError(f"{self.node.name} still has requests: drain it first")

        def swap(eng: LLMEngine) -> None:
            st = eng.stats()
            if st.waiting or st.running or st.prefilled or st.waiting_for_kv:
                raise ValueError(f"{self.node.name} still has requests: drain it first")
            eng.config.role = role

        await self.worker.acall(swap)
        if role == "decode" and self.decode.receiver is None:
            self.decode.start()
        self.role = role
        return self.state()

    # ---- prompt scoring ---------------------------------------------------------------------
    async def score_prompt(self, req: PromptScore) -> PromptScoreResult:
        """The prompt's log-probabilities (``echo`` with ``logprobs``), in the engine thread;
        ValueError for token ids outside the vocabulary."""
        ids = req.prompt_token_ids

        def run(eng: LLMEngine) -> list[TokenLogprobMsg]:
            return [TokenLogprobMsg.of(lp) for lp in prompt_logprobs(eng.model, ids, req.k)[1:]]

        return PromptScoreResult(logprobs=await self.worker.acall(run))

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> NodeState:
        st = self.engine.stats()
        return NodeState(
            name=self.node.name,
            cluster=self.cluster.name,
            role=self.role,
            pid=os.getpid(),
            kv_addr=(self.node.host, self.kv_port) if self.role == "decode" else None,
            waiting=st.waiting,
            running=st.running,
            pending_tokens=st.pending_tokens,
            expecting=st.waiting_for_kv,
            max_num_seqs=st.max_num_seqs,
            cache_usage=st.cache_usage,
            cache_hit_tokens=st.cache_hit_tokens,
            cache_query_tokens=st.cache_query_tokens,
            prefill_tokens_computed=st.prefill_tokens_computed,
            decode_tokens=st.decode_tokens,
            links=self.prefill.link_readings(),
            stats=self.counters,
            pool=self.pool.stats(),
        )


def _use_device(dev: Any) -> None:
    """Make a node's CUDA device the current one of this thread, so that streams, graphs and
    pinned buffers created without an explicit device land on it (a node on ``cuda:1``)."""
    if dev.type == "cuda" and dev.index is not None:
        import torch

        torch.cuda.set_device(dev)
