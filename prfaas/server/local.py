"""One engine in this process behind the gateway's OpenAI API: the backend of ``prfaas serve``
(one model on one machine, as ``vllm serve``).

``LocalBackend`` offers what ``prfaas.server.gateway.api.build_gateway_app`` uses of a ``Router``
(``generate``, ``metrics``, ``admission``, ``start``/``stop``, ``nodes_info``, ``policy``,
``cfg.model``) and ``prompt_logprobs`` (``echo`` with ``logprobs``): a request is added to a
mixed-role ``LLMEngine`` running in its ``EngineWorker`` thread and its outputs come back as
the same ``TokenEvent`` messages a decode node streams, so the API, its features and its metrics
are the gateway's.  ``/metrics`` adds the engine's gauges
(``prfaas.server.node.metrics``, node name ``serve``, cluster ``local``).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from prfaas.engine import LLMEngine
from prfaas.engine.sampling import prompt_logprobs
from prfaas.server.gateway.admission import Admission
from prfaas.server.gateway.handover import Generation, RouteInfo
from prfaas.server.gateway.metrics import RouterMetrics
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.gateway.router import new_request_id
from prfaas.server.node.decode import Expectation
from prfaas.server.node.engine_worker import EngineWorker
from prfaas.server.node.metrics import NodeCollector
from prfaas.server.node.wire import engine_params
from prfaas.server.protocol import NodeState, SamplingParamsMsg, TokenLogprobMsg

NODE, CLUSTER = "serve", "local"


@dataclass
class ServedModel:
    """What the API reads of a deployment config: the model (preset or directory)."""

    model: str


@dataclass
class NoPolicy:
    threshold: float | None = None


class LocalStream:
    """A request's outputs from the engine thread as ``TokenEvent`` messages (what a
    ``Generation`` reads: ``next``, ``close_soon``)."""

    def __init__(self, worker: EngineWorker, exp: Expectation) -> None:
        self.worker, self.exp = worker, exp
        self.dead: str | None = None
        self._closed = False

    async def next(self) -> Any:
        return await self.exp.queue.get()

    def close_soon(self, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if abort and not self.exp.finished:
            rid = self.exp.rid
            self.worker.unsubscribe(rid)
            self.worker.call(lambda eng: eng.abort(rid))


class LocalBackend:
    def __init__(self, engine: LLMEngine, model_name: str, max_inflight: int = 256) -> None:
        self.engine = engine
        self.worker = EngineWorker(engine)
        self.cfg = ServedModel(engine.config.model)
        self.policy = NoPolicy()
        self.metrics = RouterMetrics(model_name)
        # the engine's gauges beside the request metrics (running: the gateway's, admitted)
        self.metrics.registry.register(
            NodeCollector(
                self.state,
                model_name,
                lambda: engine.stats().preemptions,
                exclude={"vllm:num_requests_running"},
            )
        )
        self.admission = Admission(engine.config.max_model_len, max_inflight, self.metrics)
        self._started = False

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def start(self) -> None:
        if not self._started:
            self.worker.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            await asyncio.to_thread(self.worker.stop)
            self._started = False

    def state(self) -> NodeState:
        st = self.engine.stats()
        return NodeState(
            name=NODE,
            cluster=CLUSTER,
            role="decode",
            pid=os.getpid(),
            waiting=st.waiting,
            running=st.running,
            pending_tokens=st.pending_tokens,
            max_num_seqs=st.max_num_seqs,
            cache_usage=st.cache_usage,
            cache_hit_tokens=st.cache_hit_tokens,
            cache_query_tokens=st.cache_query_tokens,
            prefill_tokens_computed=st.prefill_tokens_computed,
            decode_tokens=st.decode_tokens,
        )

    def nodes_info(self) -> list[dict[str, Any]]:
        return [{"name": NODE, "cluster": CLUSTER, "role": "mixed", "up": self._started}]

    async def generate(self, prompt: list[int], params: SamplingParamsMsg) -> Generation:
        """Admit and queue the request in the engine (APIError 400 bad input, 429 overloaded)."""
        self.admission.admit(prompt)
        try:
            p = engine_params(params)
        except ValueError as e:
            self.admission.release("error_400")
            raise APIError(400, str(e)) from None
        rid = new_request_id()
        route = RouteInfo(
            rid,
            prefill_cluster=CLUSTER,
            prefill_node=NODE,
            decode_node=NODE,
            timings={"arrival": time.time()},
        )
        exp = Expectation(rid, p, asyncio.get_running_loop(), asyncio.Queue())
        arrival = time.monotonic()

        def add(eng: LLMEngine) -> None:
            self.worker.subscribe(rid, exp.on_output)
            try:
                eng.add_request(prompt, p, rid)
            except BaseException:
                self.worker.unsubscribe(rid)
                raise

        try:
            await self.worker.acall(add)
        except ValueError as e:
            self.admission.release("error_400")
            raise APIError(400, str(e), param="prompt") from None
        except BaseException:
            self.admission.release("cancelled")
            self.worker.call(lambda eng: eng.abort(rid))
            raise
        return Generation(route, LocalStream(self.worker, exp), self.release, arrival, len(prompt))

    async def prompt_logprobs(self, prompt: list[int], k: int) -> list[TokenLogprobMsg]:
        """The log-probability and top ``k`` of each prompt token after the first, computed in
        the engine thread (``prfaas.engine.sampling.prompt_logprobs``)."""

        def run(eng: LLMEngine) -> list[TokenLogprobMsg]:
            return [TokenLogprobMsg.of(lp) for lp in prompt_logprobs(eng.model, prompt, k)[1:]]

        return await self.worker.acall(run)

    def release(self, gen: Generation, outcome: str) -> None:
        self.admission.release(outcome)
        self.metrics.observe_request(gen, outcome)
