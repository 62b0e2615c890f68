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
from prfaas.server.config import DeployConfig
from prfaas.server.node.decode import DecodeSide
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.node.kv_layout import layout_for_engine
from prfaas.server.node.prefill import PrefillSide
from prfaas.server.node.prefix_pool import PrefixPool
from prfaas.server.node.routes import build_node_app
from prfaas.server.protocol import NodeCounters, NodeState


class NodeServer:
    """Everything of one node process (build with ``NodeServer(cfg, name)``, then ``start()``)."""

    def __init__(self, cfg: DeployConfig, node_name: str, engine: LLMEngine | None = None) -> None:
        self.cfg = cfg
        self.cluster, self.node = cfg.node(node_name)
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

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> NodeState:
        eng = self.engine
        return NodeState(
            name=self.node.name,
            cluster=self.cluster.name,
            role=self.role,
            pid=os.getpid(),
            kv_addr=(self.node.host, self.kv_port) if self.role == "decode" else None,
            waiting=len(eng.waiting),
            running=len(eng.running),
            pending_tokens=sum(r.num_pending for r in list(eng.waiting) + list(eng.running)),
            expecting=len(self.decode.expect),
            max_num_seqs=eng.config.max_num_seqs,
            cache_usage=eng.cache.usage(),
            cache_hit_tokens=eng.cache.hits,
            cache_query_tokens=eng.cache.queries,
            prefill_tokens_computed=eng.num_prefill_tokens_computed,
            decode_tokens=eng.num_decode_tokens,
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
