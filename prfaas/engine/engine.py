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
from dataclasses import dataclass
from functools import partial

import torch

from prfaas.cache.hashing import hash_chain
from prfaas.cache.hybrid import CacheFull, HybridCache
from prfaas.engine.config import ROLES, EngineConfig
from prfaas.engine.kv_io import (
    export_layer,
    validate_export,
    validate_header,
    validate_layer,
    write_import,
    write_layer,
)
from prfaas.engine.memory_plan import plan_memory
from prfaas.engine.model_runner import ModelRunner
from prfaas.engine.request import KVArrival, Request, RequestOutput, Status
from prfaas.engine.sampling import SamplingParams
from prfaas.engine.scheduler import Scheduler, SchedulerOutput
from prfaas.engine.stats import EngineStats
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader
from prfaas.model.batch import SeqInput
from prfaas.model.checkpoint import build_model
from prfaas.model.model import HybridForCausalLM
from prfaas.tokenizer import Tokenizer, load_tokenizer, stop_ids_of

__all__ = ["ROLES", "EngineConfig", "LLMEngine", "LayerListener"]

LayerListener = Callable[[Request, LayerPart], None]
ImportDone = Callable[[str | None], None]


@dataclass
class _PendingDecode:
    """A greedy decode step launched and not yet read back (``EngineConfig.async_decode``)."""

    sched: SchedulerOutput
    tokens: torch.Tensor  # (n,) int64 on the device: each row's greedy token
    host: torch.Tensor  # (n,) its host copy (pinned on CUDA), filled asynchronously
    event: torch.cuda.Event | None  # set once ``host`` holds the tokens (CUDA)

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        model: HybridForCausalLM | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = cfg = config or EngineConfig()
        self.device, self.dtype = cfg.resolved_device(), cfg.resolved_dtype()
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
        self._pending: _PendingDecode | None = None  # async_decode: launched, not read back
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

    def _validate_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        limit = self.config.max_model_len
        if len(prompt) >= limit:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; this engine accepts at most {limit - 1} "
                f"(max_model_len {limit})"
            )
        need = self.cache.blocks_for(len(prompt) + 1)
        if need > self.cache.cfg.num_blocks:
            raise ValueError(
                f"prompt needs {need} cache blocks; the cache holds only {self.cache.cfg.num_blocks}"
            )

    def _new_request(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None
    ) -> Request:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(ids)
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
        ``import_kv``; it ends after ``timeout_s`` without its KV (finish reason ``error``) or on
        ``abort``, reported as an output like any other. ValueError on bad input."""
        if self.config.role == "prefill":
            raise ValueError("a prefill-role engine cannot import requests")
        req = self._new_request(prompt, params, request_id)
        self.scheduler.expect_kv(req, timeout_s)
        return self.cache.match(req.prompt, need_state=False, max_tokens=len(prompt) - 1).num_tokens

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
        self._validate_prompt(prompt)
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
        """Abort every request (after a failed step: the engine starts clean); returns how many.
        A pipelined step not read back is dropped."""
        self._pending = None
        reqs = list(self.scheduler.requests.values())
        for req in reqs:
            self.scheduler.finish(req, "abort", report=True)
        return len(reqs)

    # ----- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; returns an output for every request that got a new token
        or finished (with ``async_decode``, a pipelined decode step's outputs come one call later)."""
        if self._pending is not None:
            return self._step_pipelined()
        sched = self.scheduler.schedule()
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
        logits = self.runner.step(self._inputs(sched), self.cache.tensors, callback)
        # one device-to-host copy per step: every row's argmax, and the logits themselves only
        # when some row samples (a per-row copy would synchronise once per request)
        argmax = logits.argmax(-1).tolist()
        if not all(r.request.params.plain_greedy for r in rows):
            logits = logits.cpu()
        tokens: list[int | None] = []
        for row, lg, top in zip(rows, logits, argmax, strict=True):
            req = row.request
            if not row.samples:
                tokens.append(None)
            elif req.params.plain_greedy:
                tokens.append(top)
            else:
                try:
                    tokens.append(self._sample(req, lg, top))
                except Exception as e:  # noqa: BLE001 - this request ends with the error, alone
                    err = f"sampling failed: {type(e).__name__}: {e}"
                    self.scheduler.finish(req, "error", report=True, error=err)
                    tokens.append(None)  # its row is dropped (the request ended)
        return tokens

    def _inputs(self, sched: SchedulerOutput) -> list[SeqInput]:
        """The model inputs of ``sched``'s rows: each row's tokens at its positions; ``ahead``
        rows' token is not known on the host yet (a placeholder)."""
        toks: list[int] = []
        for row in sched.rows:
            n = row.num_tokens
            toks += [0] * n if sched.ahead else row.request.token_slice(row.start, n)
        ids = torch.tensor(toks).split([r.num_tokens for r in sched.rows])  # a view per row
        out = []
        for row, t in zip(sched.rows, ids, strict=True):
            seq = row.request.cache
            assert seq is not None
            out.append(SeqInput(t, row.start, seq.blocks, seq.slot))
        return out

    def _sample(self, req: Request, logits: torch.Tensor, argmax: int) -> int:
        """The next token of ``req`` from its row of logits (``argmax``: already known); its
        log-probabilities recorded when asked for."""
        p = req.params
        if p.plain_greedy:
            return argmax
        if p.greedy and not p.processes_logits:
            tok = argmax
        elif not p.processes_logits:
            tok = req.sampler.sample(logits, len(req.output))
        else:
            tok = req.sampler.sample(
                logits, len(req.output), req.prompt, req.output, self._stop_ids(p)
            )
        if p.logprobs is not None:
            req.logprobs.append(req.sampler.logprobs(logits, tok))
        return tok

    def _stop_ids(self, p: SamplingParams) -> list[int]:
        """The tokens ``min_tokens`` holds back: the request's stop tokens and, unless it
        ignores EOS, the model's."""
        return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.stop_ids))

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

    def _launch(self, sched: SchedulerOutput, device_tokens: torch.Tensor | None) -> _PendingDecode:
        """Launch the greedy decode step ``sched``: its input tokens from the host, or (an
        ``ahead`` step) ``device_tokens``, the tokens of a step not yet read back."""
        logits = self.runner.step(
            self._inputs(sched), self.cache.tensors, None, device_tokens=device_tokens
        )
        tokens = logits.argmax(-1)
        event = None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = tokens
        self.num_steps += 1
        self.num_pipelined_steps += device_tokens is not None
        return _PendingDecode(sched, tokens, host, event)

    def _step_pipelined(self) -> list[RequestOutput]:
        p, self._pending = self._pending, None
        assert p is not None
        nxt = None
        ahead = self.scheduler.schedule_ahead(p.sched)
        if ahead is not None:
            tokens = p.tokens
            if len(ahead.rows) < len(p.sched.rows):  # some rows end: gather the others' tokens
                index = {id(r.request): i for i, r in enumerate(p.sched.rows)}
                pick = torch.tensor([index[id(r.request)] for r in ahead.rows])
                if tokens.is_cuda:  # from pinned memory: a pageable copy would wait for step p
                    pick = pick.pin_memory().to(tokens.device, non_blocking=True)
                tokens = tokens.index_select(0, pick)
            nxt = self._launch(ahead, tokens)
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
        s, c = self.scheduler, self.cache
        live = list(s.waiting) + s.running
        return EngineStats(
            waiting=len(s.waiting),
            running=len(s.running),
            prefilling=sum(r.in_prefill for r in s.running),
            waiting_for_kv=len(s.waiting_for_kv),
            kv_arrived=len(s.arrived),
            prefilled=len(s.prefilled),
            pending_tokens=sum(r.num_pending for r in live),
            max_num_seqs=self.config.max_num_seqs,
            free_slots=c.num_free_slots,
            cache_usage=c.usage(),
            cache_hit_tokens=c.hits,
            cache_query_tokens=c.queries,
            prefill_tokens_computed=s.num_prefill_tokens_computed,
            decode_tokens=s.num_decode_tokens,
            steps=self.num_steps,
            pipelined_steps=self.num_pipelined_steps,
            preemptions=s.num_preemptions,
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
        bs = self.cache.block_size
        return TransferHeader(
            request_id=req.request_id,
            model_fingerprint=self.model_config.fingerprint(),
            num_layers=self.model_config.num_hidden_layers,
            layer_kinds=self.model_config.layer_kinds,
            token_start=token_start,
            token_end=len(req.prompt) - 1,
            prompt_token_ids=list(req.prompt),
            prefix_hashes=hash_chain(req.prompt, bs),
            meta={
                "seed": req.sampler.seed,
                "tensor_parallel_size": self.config.tensor_parallel_size,
            },
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
        parts = [
            export_layer(self.cache, req.cache, i, token_start, end)
            for i in range(self.model_config.num_hidden_layers)
        ]
        return KVExport(self.make_header(req, token_start), parts)

    def release(self, request_id: str) -> None:
        """Free a prefilled request's cache (after its export was sent, or on error)."""
        req = self.scheduler.prefilled.get(request_id)
        if req is not None:
            self.scheduler.finish(req, "prefilled")
