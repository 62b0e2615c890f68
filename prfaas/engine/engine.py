"""One node's engine: continuous batching with a per-step token budget, chunked prefill mixed with
decodes, a hybrid prefix cache, and the roles ``mixed``, ``prefill`` and ``decode``.

* ``mixed``: prefill then decode, end to end.
* ``prefill``: stops after the prefill (and the first sampled token); the request keeps its cache
  until ``export_request`` / ``release``. A ``layer_listener`` receives each layer's part as soon as
  the last prefill chunk has written it (layer-wise streaming).
* ``decode``: starts from an imported cache and decodes: ``expect_kv`` holds a request waiting for
  its KV, ``import_layer`` writes each layer as it lands (optional), ``import_kv`` hands the whole
  KV over (the rest written once there is room), or ``import_request`` imports at once.

A step is schedule -> run -> update: the ``Scheduler`` (scheduler.py) picks the rows, the model runs
them here, the scheduler takes the sampled tokens back. With ``async_decode``, a greedy decode-only
step is launched before the previous one's tokens are read back (outputs come one call later).
The engine is not thread-safe: one thread drives it (``server.engine_worker``).
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Callable
from functools import partial

import torch

from prfaas.cache.hybrid import CacheFull, HybridCache
from prfaas.engine.async_decode import PendingDecode, carried_tokens, launch_greedy
from prfaas.engine.config import ROLES, EngineConfig
from prfaas.engine.kv_io import (
    export_kv,
    export_layer,
    transfer_header,
    validate_export,
    validate_header,
    validate_layer,
    write_import,
    write_layer,
)
from prfaas.engine.memory_plan import plan_memory
from prfaas.engine.model_runner import ModelRunner
from prfaas.engine.request import KVArrival, Request, RequestOutput, Status, check_prompt
from prfaas.engine.sampling import SamplingParams
from prfaas.engine.scheduler import Scheduler, SchedulerOutput
from prfaas.engine.stats import EngineStats, engine_stats
from prfaas.engine.step_io import model_inputs, row_tokens
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader
from prfaas.model.checkpoint import build_model
from prfaas.model.model import HybridForCausalLM
from prfaas.tokenizer import Tokenizer, load_tokenizer, stop_ids_of

__all__ = ["ROLES", "EngineConfig", "LLMEngine", "LayerListener"]

LayerListener = Callable[[Request, LayerPart], None]
ImportDone = Callable[[str | None], None]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        model: HybridForCausalLM | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = cfg = config or EngineConfig()
        self.device, self.dtype = cfg.resolved_device(), cfg.resolved_dtype()
        if model is not None and cfg.tensor_parallel_size == 1:  # "auto": where it lives, as it is
            w = model.lm_head.weight
            self.device = w.device if cfg.device == "auto" else self.device
            self.dtype = w.dtype if cfg.dtype == "auto" else self.dtype
        self.tp = None  # tensor_parallel_size > 1: the ranks (prfaas.engine.tp_runtime)
        if cfg.tensor_parallel_size > 1:
            if model is not None:
                raise ValueError("a tensor-parallel engine builds its ranks' models itself")
            from prfaas.engine.tp_runtime import TPRuntime

            self.config = cfg = dataclasses.replace(cfg, cuda_graphs=False, async_decode=False)
            self.tp = TPRuntime(
                cfg.model, cfg.tensor_parallel_size, self.device, self.dtype, cfg.seed
            )
            self.model = self.tp.model
        else:
            self.model = model or build_model(cfg.model, self.device, self.dtype, cfg.seed)
        self.model_config = self.model.config
        try:
            self.tokenizer = tokenizer or load_tokenizer(cfg.model, self.model_config.eos_token_id)
            cache_cfg, self.memory_plan = cfg.cache_config(), None
            if self.device.type == "cuda" and cfg.num_blocks is None:
                plan = (
                    self.tp.plan_memory if self.tp is not None else partial(plan_memory, self.model)
                )
                self.memory_plan = plan(
                    cache_cfg, cfg.gpu_memory_utilization, cfg.max_num_batched_tokens
                )
                cache_cfg = self.memory_plan.cache_config
            if self.tp is not None:
                self.cache = self.tp.make_cache(cache_cfg, self.dtype)
                self.runner = self.tp.runner()
            else:
                self.cache = HybridCache(self.model_config, cache_cfg, self.device, self.dtype)
                self.runner = ModelRunner(self.model, cuda_graphs=cfg.cuda_graphs)
        except BaseException:
            self.close()
            raise
        # a request ends on these unless it sets ignore_eos
        self.stop_ids = stop_ids_of(self.tokenizer)
        self.scheduler = Scheduler(cfg.scheduler_config(self.stop_ids), self.cache)
        self.layer_listener: LayerListener | None = None
        self._pending: PendingDecode | None = None  # async_decode: launched, not read back
        # the requests the step under way runs (None until it has chosen them): those a failed
        # step ends (fail_step)
        self._stepping: list[Request] | None = None
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_pipelined_steps = 0  # async_decode: steps launched before the last was read back

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do for one rank); idempotent."""
        if self.tp is not None:
            self.tp.close()

    # ----- requests in ------------------------------------------------------------------------
    def _new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def _new_request(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None
    ) -> Request:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids, self.model_config.vocab_size, self.config.max_model_len, self.cache)
        rid = request_id or self._new_id()
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} already in use")
        return Request(rid, ids, params, self.config.seed * 1_000_003 + zlib.crc32(rid.encode()))

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        kv_start: int = 0,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError on bad input.

        Prefill role: the engine computes all prompt tokens but the last, then holds the cache for
        ``export_request``; ``kv_start`` (block aligned: the prefix the decode node already holds)
        is where the layer-wise stream of the MLA KV starts."""
        if self.config.role == "decode":
            raise ValueError("a decode-role engine takes requests only with their KV (expect_kv)")
        req = self._new_request(prompt, params, request_id)
        if self.config.role == "prefill":
            n = len(req.prompt)
            if not 0 <= kv_start <= n - 1 or kv_start % self.cache.block_size:
                raise ValueError(f"kv_start {kv_start} must be block aligned and at most {n - 1}")
            req.handoff_at, req.kv_start = n - 1, kv_start
        self.scheduler.add(req)
        return req.request_id

    def expect_kv(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Hold a request whose prompt's KV another node computes (decode or mixed role). Returns
        the prompt tokens this node already holds in its prefix cache (block aligned, at most
        ``len(prompt) - 1``): the KV to send starts there. The request holds no cache until
        ``import_kv`` but the blocks of that prefix, held meanwhile (so that the KV sent from
        there still fits when it arrives); it ends after ``timeout_s`` without its KV (finish
        reason ``error``) or on ``abort``, reported as an output like any other. ValueError on
        bad input."""
        if self.config.role == "prefill":
            raise ValueError("a prefill-role engine cannot import requests")
        req = self._new_request(prompt, params, request_id)
        return self.scheduler.expect_kv(req, timeout_s)

    def import_kv(self, exp: KVExport, on_done: ImportDone | None = None) -> None:
        """The KV of a request held by ``expect_kv`` (matched by the header's request id). Checked
        now: ImportMismatch / ValueError if it does not fit (the request keeps waiting), KeyError if
        nobody waits for it. It is written into the cache at the next ``step()`` with a free slot
        and blocks, before any new request is admitted, and decodes from that step on.
        ``on_done(error)`` is called on the engine thread once ``exp`` was written (``None``) or
        dropped (the reason): the request ended first, or the cached prefix before
        ``token_start`` is gone (then the request waits on, for a KV from a lower
        ``token_start``). ``exp``'s buffers may be reused once it was called."""
        h = exp.header
        req = self.scheduler.waiting_for_kv.get(h.request_id)
        if req is None or req.kv_arrival is not None:
            raise KeyError(f"no request {h.request_id!r} is waiting for its KV")
        if req.kv_staged != (h.token_start, h.token_end):  # layers written for another range
            self.scheduler.unreserve_import(req)
        validate_export(self.model_config, exp, skip=req.kv_layers)
        if list(h.prompt_token_ids) != req.prompt:
            raise ValueError(f"the KV of {h.request_id!r} is for another prompt")
        if req.params.seed is None:  # the prefill node's seed: tokens as on one mixed node
            req.sampler.seed = h.meta.get("seed", req.sampler.seed)
        self.scheduler.kv_arrived(h.request_id, KVArrival(h.token_start, h.token_end, exp, on_done))

    def import_layer(self, header: TransferHeader, part: LayerPart) -> bool:
        """One verified layer of the KV of a request held by ``expect_kv``, written into its
        cache as it lands while later layers are still on the wire (the first one reserves the
        request's slot and blocks). Returns whether it was written; when not (nobody waits, no
        room now, a part that does not fit), ``import_kv`` writes it with the rest, and raises
        if it does not fit. ``part``'s buffers may be reused once this returns."""
        req = self.scheduler.waiting_for_kv.get(header.request_id)
        if req is None or req.kv_arrival is not None or list(header.prompt_token_ids) != req.prompt:
            return False
        span = (header.token_start, header.token_end)
        try:
            if req.kv_staged != span:
                validate_header(self.model_config, header)
                self.scheduler.unreserve_import(req)
                self.scheduler.reserve_import(req, *span)
            validate_layer(self.model_config, header, part)
        except (CacheFull, ValueError):  # ImportMismatch is a ValueError
            return False
        assert req.cache is not None
        write_layer(self.cache, req.cache, header.token_start, header.token_end, part)
        req.kv_layers.add(part.layer)
        return True

    def drop_layers(self, request_id: str) -> None:
        """Forget the layers ``import_layer`` wrote for a request still waiting for its KV (its
        transfer failed) and give back its reserved slot and blocks."""
        req = self.scheduler.waiting_for_kv.get(request_id)
        if req is not None and req.kv_arrival is None:
            self.scheduler.unreserve_import(req)

    def import_request(
        self, exp: KVExport, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Continue decoding a request from an imported cache at once (decode or mixed role).
        Everything is validated before the cache is touched: ImportMismatch / ValueError (the
        prefix before ``token_start`` must be in this node's prefix cache), CacheFull when there is
        no room now."""
        if self.config.role == "prefill":
            raise ValueError("a prefill-role engine cannot import requests")
        validate_export(self.model_config, exp)
        h = exp.header
        params = params or SamplingParams()
        prompt = list(h.prompt_token_ids)
        check_prompt(prompt, self.model_config.vocab_size, self.config.max_model_len, self.cache)
        seed = h.meta.get("seed", self.config.seed)
        req = Request(request_id or h.request_id, prompt, params, seed)
        self.scheduler.admit_import(req, h.token_start, h.token_end)
        self._write_import(req, exp)
        return self._output(req)

    def _write_import(self, req: Request, exp: KVExport, report: bool = False) -> None:
        """Write ``exp`` into ``req``'s admitted cache; on failure ``req`` ends (with ``error``,
        reported if ``report``: nothing of it stays behind) and the exception propagates."""
        assert req.cache is not None
        try:
            write_import(self.cache, req.cache, exp, skip=req.kv_layers)
            req.kv_layers = set()
        except BaseException as e:
            self.scheduler.finish(req, "error", report=report, error=f"KV import failed: {e!r}")
            raise
        self.scheduler.import_written(req)

    def abort(self, request_id: str) -> None:
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.finish(req, "abort", report=True)

    def abort_all(self) -> int:
        """Abort every request (the engine starts clean); returns how many. A pipelined step not
        read back is dropped."""
        self._pending = None
        reqs = list(self.scheduler.requests.values())
        for req in reqs:
            self.scheduler.finish(req, "abort", report=True)
        return len(reqs)

    def fail_step(self, error: BaseException) -> list[RequestOutput]:
        """After ``step()`` raised ``error``: end (``abort``, with the error) the requests that
        step ran, and return the outputs due now (theirs first); nothing runs. Their caches may
        be half written; the others' are not touched by a step (a row writes only its own blocks
        and state slot, and publishes them in the prefix cache only after its step), so they go
        on. Every request ends when the failed step had not chosen its requests yet (the
        scheduler failed) or the engine is tensor-parallel (its ranks may be out of step).
        A pipelined step not read back is dropped (its requests are the failed step's)."""
        reqs = self._stepping
        if reqs is None or self.tp is not None:
            reqs = list(self.scheduler.requests.values())
        self._pending, self._stepping = None, None
        msg = f"the engine step failed: {type(error).__name__}: {error}"
        for req in reqs:
            if req.status != Status.FINISHED:
                self.scheduler.finish(req, "abort", report=True, error=msg)
        return self._outputs(self.scheduler.take_reports())

    # ----- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; returns an output for every request that got a new token
        or finished (with ``async_decode``, a pipelined decode step's outputs come one call later)."""
        self._stepping = None
        if self._pending is not None:
            return self._step_pipelined()
        sched = self.scheduler.schedule()
        imported = [i.request for i in sched.imports if i.error is None]
        self._stepping = imported + [r.request for r in sched.rows]
        self._write_imports(sched)
        if self._pipelinable(sched):
            self._pending = self._launch(sched, None)
            return self._outputs(self.scheduler.take_reports())
        return self._outputs(self.scheduler.update_from_output(sched, self._run(sched)))

    def _write_imports(self, sched: SchedulerOutput) -> None:
        failed = False
        for imp in sched.imports:
            err = imp.error
            if err is None:
                try:
                    self._write_import(imp.request, imp.arrival.data, report=True)
                except Exception as e:  # noqa: BLE001 - the request ends with the error
                    err, failed = f"{type(e).__name__}: {e}", True
            if imp.arrival.on_done is not None:
                imp.arrival.on_done(err)
        if failed:  # those requests ended: their rows go
            sched.rows[:] = [r for r in sched.rows if r.request.status == Status.RUNNING]

    def _run(self, sched: SchedulerOutput) -> list[int | None]:
        """Run the rows on the model; each sampling row's token (None for the others)."""
        rows = sched.rows
        if not rows:
            return []
        self.num_steps += 1
        callback = self._streaming_callback(sched)
        logits = self.runner.step(model_inputs(sched), self.cache.tensors, callback)
        return row_tokens(rows, logits, self.stop_ids, self._sampling_failed)

    def _sampling_failed(self, req: Request, error: str) -> None:
        self.scheduler.finish(req, "error", report=True, error=error)

    def _streaming_callback(self, sched: SchedulerOutput) -> Callable[[int], None] | None:
        if self.config.role != "prefill" or self.layer_listener is None:
            return None
        done = [r.request for r in sched.rows if r.hands_off]
        if not done:
            return None
        listener = self.layer_listener

        def on_layer(layer: int) -> None:
            for r in done:
                listener(r, export_layer(self.cache, r.cache, layer, r.kv_start, r.handoff_at))

        on_layer.slots = [r.cache.slot for r in done]  # type: ignore[attr-defined] # TP: gathered
        return on_layer

    # ----- pipelined greedy decode (async_decode) ---------------------------------------------
    def _pipelinable(self, sched: SchedulerOutput) -> bool:
        return (
            self.config.async_decode
            and self.config.role != "prefill"
            and self.scheduler.can_pipeline(sched)
        )

    def _launch(self, sched: SchedulerOutput, device_tokens: torch.Tensor | None) -> PendingDecode:
        """Launch the greedy decode step ``sched`` (:func:`async_decode.launch_greedy`)."""
        pending = launch_greedy(self.runner, self.cache.tensors, sched, device_tokens)
        self.num_steps += 1
        self.num_pipelined_steps += device_tokens is not None
        return pending

    def _step_pipelined(self) -> list[RequestOutput]:
        p, self._pending = self._pending, None
        assert p is not None
        self._stepping = [r.request for r in p.sched.rows]  # the next step's are among them
        nxt = None
        ahead = self.scheduler.schedule_ahead(p.sched)
        if ahead is not None:
            nxt = self._launch(ahead, carried_tokens(p, ahead))
        # read step p back while the device runs the next one
        outs = self._outputs(self.scheduler.update_from_output(p.sched, p.read()))
        self._pending = nxt
        return outs

    # ----- outputs ----------------------------------------------------------------------------
    def _outputs(self, reqs: list[Request]) -> list[RequestOutput]:
        return [self._output(r) for r in reqs]

    def _output(self, req: Request) -> RequestOutput:
        out = req.to_output()
        if out.finished:  # decoding the whole output on every step would cost O(n) per token
            out.text = self.tokenizer.decode(req.output)
        return out

    def has_unfinished(self) -> bool:
        """Work left: queued or running requests, arrived KV, or outputs not yet returned by
        step(). Requests still waiting for their KV do not count."""
        return self.scheduler.has_unfinished() or self._pending is not None

    def stats(self) -> EngineStats:
        return engine_stats(
            self.scheduler,
            self.cache,
            self.config.max_num_seqs,
            self.num_steps,
            self.num_pipelined_steps,
        )

    # the scheduler's queues and counters (read-only views; callers use stats())
    @property
    def waiting(self) -> list[Request]:
        return list(self.scheduler.waiting)

    @property
    def running(self) -> list[Request]:
        return list(self.scheduler.running)

    @property
    def requests(self) -> dict[str, Request]:
        return dict(self.scheduler.requests)

    @property
    def prefilled(self) -> dict[str, Request]:
        return dict(self.scheduler.prefilled)

    @property
    def num_prefill_tokens_computed(self) -> int:
        return self.scheduler.num_prefill_tokens_computed

    @property
    def num_decode_tokens(self) -> int:
        return self.scheduler.num_decode_tokens

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ----- prefill → decode hand-off ----------------------------------------------------------
    def make_header(self, req: Request, token_start: int = 0) -> TransferHeader:
        """The transfer header of ``req``'s KV from ``token_start`` (:func:`kv_io.transfer_header`)
        with the request's sampling seed and this engine's tensor-parallel size."""
        meta = {"seed": req.sampler.seed, "tensor_parallel_size": self.config.tensor_parallel_size}
        return transfer_header(
            self.model_config, req.request_id, req.prompt, token_start, self.cache.block_size, meta
        )

    def export_request(self, request_id: str, token_start: int = 0) -> KVExport:
        """The cache of a prefilled request (prefill role): the MLA KV of prompt tokens
        [token_start, L - 1) and the KDA/conv states after L - 1 tokens. The decode node computes
        the last prompt token itself and samples the first output token."""
        req = self.scheduler.prefilled.get(request_id)
        if req is None:
            raise KeyError(f"no prefilled request {request_id!r}")
        end = len(req.prompt) - 1
        if not 0 <= token_start <= end or token_start % self.cache.block_size:
            raise ValueError(f"token_start {token_start} must be block aligned and at most {end}")
        return export_kv(self.cache, req.cache, self.make_header(req, token_start))

    def release(self, request_id: str) -> None:
        """Free a prefilled request's cache (after its export was sent, or on error)."""
        req = self.scheduler.prefilled.get(request_id)
        if req is not None:
            self.scheduler.finish(req, "prefilled")
