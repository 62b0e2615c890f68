"""One node's engine: continuous batching with a per-step token budget, chunked prefill mixed with
decodes, a hybrid prefix cache, and the roles ``mixed``, ``prefill`` and ``decode``.

* ``mixed``: prefill then decode, end to end.
* ``prefill``: stops after the prefill (and the first sampled token); the request keeps its cache
  until ``export_request`` / ``release``. A ``layer_listener`` receives each layer's part as soon as
  the last prefill chunk has written it (layer-wise streaming).
* ``decode``: starts from an imported cache (``import_request``) and decodes.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prfaas.cache.hashing import hash_chain
from prfaas.cache.hybrid import CacheConfig, CacheFull, HybridCache
from prfaas.engine.kv_io import export_layer, validate_export, write_import
from prfaas.engine.model_runner import ModelRunner
from prfaas.engine.request import Request, RequestOutput, Status
from prfaas.engine.sampling import SamplingParams
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader
from prfaas.model.batch import SeqInput
from prfaas.model.checkpoint import build_model
from prfaas.model.model import HybridForCausalLM
from prfaas.tokenizer import Tokenizer, load_tokenizer, stop_ids_of

ROLES = ("mixed", "prefill", "decode")


@dataclass
class EngineConfig:
    model: str = "tiny"
    role: str = "mixed"
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    seed: int = 0  # random weights (presets) and the default sampling seed
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # token budget of one step
    max_model_len: int = 4096
    block_size: int = 16
    num_blocks: int | None = None  # default: enough for max_num_seqs sequences of max_model_len / 4
    checkpoint_interval: int = 64
    num_checkpoints: int = 64
    enable_prefix_cache: bool = True
    cuda_graphs: bool = True  # decode-only steps replay captured CUDA graphs (CUDA, dense MLP)
    # greedy decode-only steps: launch step k+1 (its input tokens taken on the device from step k)
    # before step k's tokens are read back, so the host's work overlaps the GPU's; outputs come
    # one step() call later
    async_decode: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.max_model_len < 2:
            raise ValueError(
                "max_num_batched_tokens, max_num_seqs must be >= 1, max_model_len >= 2"
            )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
                self.dtype
            ]
        except KeyError:
            raise ValueError(f"unsupported dtype {self.dtype!r}") from None

    def cache_config(self) -> CacheConfig:
        nb = self.num_blocks
        if nb is None:
            nb = max(64, self.max_num_seqs * (-(-self.max_model_len // self.block_size)) // 4)
        return CacheConfig(
            block_size=self.block_size,
            num_blocks=nb,
            max_seqs=self.max_num_seqs,
            checkpoint_interval=self.checkpoint_interval,
            num_checkpoints=self.num_checkpoints,
            enable_prefix_cache=self.enable_prefix_cache,
        )


LayerListener = Callable[[Request, LayerPart], None]


@dataclass
class _PendingDecode:
    """A greedy decode step launched and not yet read back (``EngineConfig.async_decode``)."""

    batch: list[Request]
    tokens: torch.Tensor  # (n,) int64 on the device: each row's greedy token
    host: torch.Tensor  # (n,) its host copy (pinned on CUDA), filled asynchronously
    event: torch.cuda.Event | None  # set once ``host`` holds the tokens (CUDA)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        model: HybridForCausalLM | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = cfg = config or EngineConfig()
        self.device, self.dtype = cfg.resolved_device(), cfg.resolved_dtype()
        self.model = model or build_model(cfg.model, self.device, self.dtype, cfg.seed)
        self.model_config = self.model.config
        self.tokenizer = tokenizer or load_tokenizer(cfg.model, self.model_config.eos_token_id)
        self.stop_ids = stop_ids_of(self.tokenizer)  # end a request unless it sets ignore_eos
        self.cache = HybridCache(self.model_config, cfg.cache_config(), self.device, self.dtype)
        self.runner = ModelRunner(self.model, cuda_graphs=cfg.cuda_graphs)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilled: dict[str, Request] = {}  # prefill role: done, cache held for export
        self.requests: dict[str, Request] = {}
        self.layer_listener: LayerListener | None = None
        self._forced: list[RequestOutput] = []  # finished outside a model step (abort, no room)
        self._pending: _PendingDecode | None = None  # async_decode: launched, not read back
        self._ids = itertools.count()
        # counters (tests and metrics)
        self.num_prefill_tokens_computed = 0
        self.num_decode_tokens = 0
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_pipelined_steps = 0  # async_decode: steps launched before the last was read back

    # ----- requests in ------------------------------------------------------------------------
    def _new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def _validate_prompt(self, prompt: list[int], params: SamplingParams) -> None:
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
            raise ValueError("a decode-role engine takes requests only through import_request")
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(ids, params)
        rid = request_id or self._new_id()
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} already in use")
        req = Request(rid, ids, params, self.config.seed * 1_000_003 + zlib.crc32(rid.encode()))
        if self.config.role == "prefill":
            if not 0 <= kv_start <= len(ids) - 1 or kv_start % self.cache.block_size:
                raise ValueError(
                    f"kv_start {kv_start} must be block aligned and at most {len(ids) - 1}"
                )
            req.handoff_at, req.kv_start = len(ids) - 1, kv_start
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, "abort", emit=True)

    # ----- scheduling -------------------------------------------------------------------------
    def _chunk(self, req: Request, budget: int) -> int:
        n = min(req.num_pending, budget)
        ci = self.cache.cfg.checkpoint_interval
        if self.cache.cfg.enable_prefix_cache and ci > 0 and req.cache is not None:
            nxt = (req.num_computed // ci + 1) * ci
            if req.num_computed + n > nxt and nxt <= req.cache.prompt_len:
                n = nxt - req.num_computed  # end the chunk on a checkpoint boundary
        return n

    def _preempt(self, req: Request) -> None:
        """Free a running request's cache and queue it to be recomputed from its tokens."""
        self.running.remove(req)
        if req.cache is not None:
            self.cache.close(req.cache)
            req.cache = None
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit(self, req: Request) -> bool:
        if not self.cache.num_free_slots:
            return False
        seq = self.cache.open(req.tokens)
        if not self.cache.can_reserve(seq, req.num_tokens + 1):
            self.cache.close(seq)
            return False
        self.cache.reserve(seq, req.num_tokens + 1)
        req.cache = seq
        req.num_computed = seq.num_cached_tokens
        if not req.output:
            req.num_cached_tokens = seq.num_cached_tokens
        req.status = Status.RUNNING
        self.running.append(req)
        if req.num_pending <= 0:  # prefill role, prefix all cached (or a 1-token prompt)
            self._handoff(req)
        return True

    def _handoff(self, req: Request) -> None:
        """Prefill role: the request's prefill is done; hold its cache for export."""
        self.running.remove(req)
        req.status = Status.PREFILLED
        req.finish_reason = "prefilled"
        req.metrics.finished = time.monotonic()
        self.prefilled[req.request_id] = req
        self._forced.append(self._output(req))

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        preempt_before = self.num_preemptions
        # 1. decodes first, oldest request first: one token each; when blocks run out the newest
        #    running request is preempted (recomputed later), possibly the one asking
        gone: set[int] = set()  # preempted in this loop (a set: `in self.running` is O(n))

        def preempt(r: Request) -> None:
            self._preempt(r)
            gone.add(id(r))

        for req in list(self.running):
            if id(req) in gone or req.in_prefill:
                continue
            if budget <= 0:
                break
            while not self.cache.can_reserve(req.cache, req.num_tokens + 1):
                victim = self.running[-1]
                if victim is req:
                    break
                for k, (r, n) in enumerate(batch):
                    if r is victim:
                        del batch[k]
                        budget += n
                        break
                preempt(victim)
            if not self.cache.can_reserve(req.cache, req.num_tokens + 1):
                if len(self.running) == 1:  # alone and still no room: the cache is its length limit
                    self._finish(req, "length", emit=True)
                else:
                    preempt(req)
                continue
            self.cache.reserve(req.cache, req.num_tokens + 1)
            batch.append((req, 1))
            budget -= 1
        # 2. prefills already under way (their prompt blocks were reserved at admission)
        for req in self.running:
            if budget <= 0:
                break
            if req.in_prefill:
                n = self._chunk(req, budget)
                batch.append((req, n))
                budget -= n
        # 3. admit waiting requests while slots, blocks and budget last (not right after a
        #    preemption: the freed blocks go to the requests already running)
        preempted = self.num_preemptions != preempt_before
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.popleft()
            if req.status != Status.RUNNING:
                continue  # handed off at admission
            n = self._chunk(req, budget)
            batch.append((req, n))
            budget -= n
        return batch

    # ----- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; returns an output for every request that got a new token
        or finished (with ``async_decode``, a pipelined decode step's outputs come one call later)."""
        if self._pending is not None:
            return self._step_pipelined()
        batch = self._schedule()
        outs, self._forced = self._forced, []
        if not batch:
            return outs
        if self._pipelinable(batch):
            self._pending = self._launch([r for r, _ in batch], None)
            return outs
        self.num_steps += 1
        seqs = self._inputs(batch)
        callback = self._streaming_callback(batch)
        logits = self.runner.step(seqs, self.cache.tensors, callback)
        # one device-to-host copy per step: every row's argmax, and the logits themselves only
        # when some row samples (a per-row copy would synchronise once per request)
        argmax = logits.argmax(-1).tolist()
        if not all(r.params.plain_greedy for r, _ in batch):
            logits = logits.cpu()
        for (req, n), lg, top in zip(batch, logits, argmax, strict=True):
            if req.in_prefill:
                self.num_prefill_tokens_computed += n
            else:
                self.num_decode_tokens += 1
            req.num_computed += n
            self.cache.on_computed(req.cache, req.num_computed)
            if req.handoff_at is not None and req.num_computed >= req.handoff_at:
                self.running.remove(req)
                req.status = Status.PREFILLED
                req.finish_reason = "prefilled"
                req.metrics.finished = time.monotonic()
                self.prefilled[req.request_id] = req
                outs.append(self._output(req))
                continue
            if req.num_computed < req.num_tokens:
                continue  # mid-prefill chunk
            try:
                tok = self._sample(req, lg, top)
            except Exception as e:  # noqa: BLE001 - this request ends with the error, alone
                req.error = f"sampling failed: {type(e).__name__}: {e}"
                self._finish(req, "error")
                outs.append(self._output(req))
                continue
            outs.append(self._append_token(req, tok))
        return outs

    def _inputs(self, batch: list[tuple[Request, int]], ahead: bool = False) -> list[SeqInput]:
        """The model inputs of ``batch``: each request's next ``n`` tokens at its next position;
        ``ahead``: one position further, the token not known on the host yet (a placeholder)."""
        now = time.monotonic()
        toks: list[int] = []
        for req, n in batch:
            if req.metrics.first_scheduled is None:
                req.metrics.first_scheduled = now
            toks += [0] * n if ahead else req.token_slice(req.num_computed, n)
        ids = torch.tensor(toks).split([n for _, n in batch])  # one tensor, a view per request
        return [
            SeqInput(t, req.num_computed + ahead, req.cache.blocks, req.cache.slot)
            for (req, _), t in zip(batch, ids, strict=True)
        ]

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
        eos = self.tokenizer.eos_token_id
        return list(p.stop_token_ids) + ([eos] if eos is not None and not p.ignore_eos else [])

    def _append_token(self, req: Request, tok: int) -> RequestOutput:
        req.output.append(tok)
        if req.metrics.first_token is None:
            req.metrics.first_token = time.monotonic()
        self._check_stop(req, tok)
        return self._output(req)

    # ----- pipelined greedy decode (async_decode) ---------------------------------------------
    def _pipelinable(self, batch: list[tuple[Request, int]]) -> bool:
        """A decode-only step of every running request, all greedy, nothing waiting to be admitted:
        the next step can be launched before this one's tokens are read back."""
        return (
            self.config.async_decode
            and self.config.role != "prefill"
            and not self.waiting
            and len(batch) == len(self.running)
            and all(n == 1 and not r.in_prefill and r.params.plain_greedy for r, n in batch)
        )

    def _launch(self, rows: list[Request], device_tokens: torch.Tensor | None) -> _PendingDecode:
        """Launch a decode step of ``rows``, one token each: the host's next tokens, or (with
        ``device_tokens``, the tokens of a step not yet read back) one position further."""
        seqs = self._inputs([(r, 1) for r in rows], ahead=device_tokens is not None)
        logits = self.runner.step(seqs, self.cache.tensors, None, device_tokens=device_tokens)
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
        return _PendingDecode(rows, tokens, host, event)

    def _step_pipelined(self) -> list[RequestOutput]:
        p, self._pending = self._pending, None
        assert p is not None
        live = [r for r in p.batch if r.status == Status.RUNNING]  # not aborted meanwhile
        # rows that step p does not finish by length go on, if nothing else needs the engine
        go = [
            r
            for r in live
            if len(r.output) + 1 < r.params.max_tokens
            and r.num_tokens + 1 < self.config.max_model_len
        ]
        nxt = None
        if (
            go
            and not self.waiting
            and len(live) == len(self.running)
            and all(self.cache.can_reserve(r.cache, r.num_tokens + 2) for r in go)
        ):
            for r in go:
                self.cache.reserve(r.cache, r.num_tokens + 2)
            tokens = p.tokens
            if len(go) < len(p.batch):  # some rows end: gather the others' tokens on the device
                index = {id(r): i for i, r in enumerate(p.batch)}
                pick = torch.tensor([index[id(r)] for r in go])
                if tokens.is_cuda:  # from pinned memory: a pageable copy would wait for step p
                    pick = pick.pin_memory().to(tokens.device, non_blocking=True)
                tokens = tokens.index_select(0, pick)
            nxt = self._launch(go, tokens)
        # read step p back while the device runs the next one
        if p.event is not None:
            p.event.synchronize()
        outs, self._forced = self._forced, []
        for req, tok in zip(p.batch, p.host.tolist(), strict=True):
            if req.status != Status.RUNNING:
                continue  # aborted, or stopped by an earlier token: its row is dropped
            self.num_decode_tokens += 1
            req.num_computed += 1
            self.cache.on_computed(req.cache, req.num_computed)
            outs.append(self._append_token(req, tok))
        self._pending = nxt
        return outs

    def _streaming_callback(self, batch: list[tuple[Request, int]]) -> Callable[[int], None] | None:
        if self.config.role != "prefill" or self.layer_listener is None:
            return None
        done = [r for r, n in batch if r.num_computed + n == r.handoff_at]
        if not done:
            return None
        listener = self.layer_listener

        def on_layer(layer: int) -> None:
            for r in done:
                listener(r, export_layer(self.cache, r.cache, layer, r.kv_start, r.handoff_at))

        return on_layer

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.stop_ids):
            self._finish(req, "stop")
        elif len(req.output) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, emit: bool = False) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.prefilled.pop(req.request_id, None)
        if req.cache is not None:
            self.cache.close(req.cache)
            req.cache = None
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.metrics.finished = time.monotonic()
        self.requests.pop(req.request_id, None)
        if emit:
            self._forced.append(self._output(req))

    def _output(self, req: Request) -> RequestOutput:
        out = req.to_output()
        if out.finished:  # decoding the whole output on every step would cost O(n) per token
            out.text = self.tokenizer.decode(req.output)
        return out

    def has_unfinished(self) -> bool:
        """Work left: queued or running requests, or outputs not yet returned by step()."""
        return bool(self.waiting or self.running or self._forced or self._pending)

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
            meta={"seed": req.sampler.seed},
        )

    def export_request(self, request_id: str, token_start: int = 0) -> KVExport:
        """The cache of a prefilled request (prefill role): the MLA KV of prompt tokens
        [token_start, L - 1) and the KDA/conv states after L - 1 tokens. The decode node computes
        the last prompt token itself and samples the first output token."""
        req = self.prefilled.get(request_id)
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
        req = self.prefilled.get(request_id)
        if req is not None:
            self._finish(req, "prefilled")

    def import_request(
        self, exp: KVExport, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Continue decoding a request from an imported cache (decode or mixed role). Everything is
        validated before the cache is touched; the prefix before ``token_start`` must be in this
        node's prefix cache."""
        if self.config.role == "prefill":
            raise ValueError("a prefill-role engine cannot import requests")
        validate_export(self.model_config, exp)
        h = exp.header
        params = params or SamplingParams()
        prompt = list(h.prompt_token_ids)
        self._validate_prompt(prompt, params)
        rid = request_id or h.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} already in use")
        if len(self.running) >= self.config.max_num_seqs or not self.cache.num_free_slots:
            raise CacheFull("no free request slot for an imported request")
        seq = self.cache.open(prompt, need_state=False, max_reuse=h.token_start)
        if seq.num_cached_tokens != h.token_start:
            self.cache.close(seq)
            raise ValueError(
                f"import starts at token {h.token_start} but only {seq.num_cached_tokens} prompt "
                "tokens are in this node's prefix cache"
            )
        if not self.cache.can_reserve(seq, len(prompt) + 1):
            self.cache.close(seq)
            raise CacheFull("no cache blocks free for an imported request")
        self.cache.reserve(seq, len(prompt) + 1)
        try:
            write_import(self.cache, seq, exp)
        except BaseException:
            self.cache.close(seq)  # nothing of the request stays behind
            raise
        seed = h.meta.get("seed", self.config.seed)
        req = Request(rid, prompt, params, seed)
        req.sampler.seed = params.seed if params.seed is not None else seed
        req.cache = seq
        req.num_computed = h.token_end  # the last prompt token is this node's first input
        req.num_cached_tokens = h.token_start
        req.status = Status.RUNNING
        self.cache.on_computed(seq, h.token_end)
        self.requests[rid] = req
        self.running.append(req)
        return self._output(req)
