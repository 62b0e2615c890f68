"""A request inside the engine and what the engine reports of it.

Life of a request: ``WAITING`` (queued; no cache) -> ``RUNNING`` (holds a state slot and cache
blocks; prefilling, then decoding) -> ``FINISHED``. A prefill-role request ends ``PREFILLED`` (its
cache held for export until released). A request whose prompt's KV comes from another node starts
``WAITING_FOR_KV`` (no cache); once the KV has arrived and there is room it is written into the
cache and the request runs (decodes). Preemption sends a running request back to ``WAITING``."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prfaas.cache.hybrid import HybridCache, SeqCache
from prfaas.engine.sampling import Sampler, SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # its prompt's KV comes from another node
    RUNNING = "running"  # prefilling or decoding
    PREFILLED = "prefilled"  # prefill role: done, cache held for export
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "prefilled" | "error"
    num_cached_tokens: int
    text: str = ""  # the decoded output: on the final output only (finished or prefilled)
    error: str | None = None
    metrics: RequestMetrics | None = None
    # params.logprobs set: one entry per token of token_ids (see prfaas.engine.sampling)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class KVArrival:
    """The imported KV of a request waiting for it: prompt tokens [token_start, token_end) of the
    MLA KV (the tokens before ``token_start`` must be in this node's prefix cache) and the KDA
    state after ``token_end`` tokens. ``data`` is what the engine writes into the cache (the
    scheduler never reads it); ``on_done(error)`` is called once, on the engine thread, when it was
    written (``None``) or dropped (the reason): the data's buffers may be reused after it."""

    token_start: int
    token_end: int
    data: Any
    on_done: Callable[[str | None], None] | None = None

    @property
    def span(self) -> tuple[int, int]:
        return (self.token_start, self.token_end)


class Request:
    def __init__(
        self, request_id: str, prompt: list[int], params: SamplingParams, default_seed: int
    ) -> None:
        self.request_id = request_id
        self.prompt = list(prompt)
        self.params = params
        self.sampler = Sampler(params, default_seed)
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # params.logprobs set: one per output token
        self.status = Status.WAITING
        self.cache: SeqCache | None = None
        self.num_computed = 0  # tokens whose KV/state is in the cache
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics()
        self.num_preemptions = 0
        # prefill role: compute up to here, then hand off (the decode node computes the last
        # prompt token and samples the first output token); None = run to the end
        self.handoff_at: int | None = None
        self.kv_start = 0  # prefill role: first token whose MLA KV the decode node needs
        # WAITING_FOR_KV: when the wait ends (time.monotonic(); None = no limit) and the KV once
        # it has arrived (until it is written into the cache)
        self.kv_deadline: float | None = None
        self.kv_arrival: KVArrival | None = None
        # layer-wise import: the token range the cache was reserved for as the first layer landed,
        # and the layers written into it since (the final import writes only the others)
        self.kv_staged: tuple[int, int] | None = None
        self.kv_layers: set[int] = set()
        # WAITING_FOR_KV: the blocks of the cached prompt prefix the KV is sent after, held (kept
        # from eviction) until the KV is admitted or the request ends
        self.kv_held: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, n: int) -> list[int]:
        """``tokens[start : start + n]`` without building the whole list."""
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start : start + n]
        if start >= p:
            return self.output[start - p : start - p + n]
        return self.prompt[start:] + self.output[: start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def target(self) -> int:
        """Tokens to have in the cache before the next sample (or the hand-off)."""
        return self.num_tokens if self.handoff_at is None else self.handoff_at

    @property
    def num_pending(self) -> int:
        """Tokens still to compute before the next sample (the next step's input)."""
        return self.target - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_pending > 1 or not self.output

    def to_output(self, text: str = "") -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt,
            token_ids=list(self.output),
            finished=self.status in (Status.FINISHED, Status.PREFILLED),
            finish_reason=self.finish_reason,
            num_cached_tokens=self.num_cached_tokens,
            text=text,
            error=self.error,
            metrics=self.metrics,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
        )


def check_prompt(
    prompt: list[int], vocab_size: int, max_model_len: int, cache: HybridCache
) -> None:
    """ValueError unless ``prompt`` is a non-empty list of token ids in [0, vocab_size), shorter
    than ``max_model_len`` tokens, whose cache (with one generated token) fits in ``cache``."""
    if not prompt:
        raise ValueError("prompt is empty")
    vocab = vocab_size
    if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
    limit = max_model_len
    if len(prompt) >= limit:
        raise ValueError(
            f"prompt has {len(prompt)} tokens; this engine accepts at most {limit - 1} "
            f"(max_model_len {limit})"
        )
    need = cache.blocks_for(len(prompt) + 1)
    if need > cache.cfg.num_blocks:
        raise ValueError(
            f"prompt needs {need} cache blocks; the cache holds only {cache.cfg.num_blocks}"
        )
