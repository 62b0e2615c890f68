"""``EngineStats``: a snapshot of one engine's queues, cache and counters (``LLMEngine.stats()``),
so that callers need not read the engine's internals. Counts are requests, tokens are tokens,
counters are totals since the engine started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.cache.hybrid import HybridCache
    from prfaas.engine.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # queued, holding no cache (new or preempted)
    running: int  # holding cache: prefilling or decoding
    prefilling: int  # of ``running``: still computing prompt tokens
    waiting_for_kv: int  # their prompt's KV comes from another node (arrived ones included)
    kv_arrived: int  # of ``waiting_for_kv``: the KV is here, waiting for a slot and blocks
    prefilled: int  # prefill role: done, cache held for export
    pending_tokens: int  # tokens to compute before the next sample, over waiting + running
    max_num_seqs: int
    free_slots: int  # request state slots free in the cache
    cache_usage: float  # fraction of the MLA blocks in use (0..1)
    cache_hit_tokens: int  # prompt tokens served from the prefix cache
    cache_query_tokens: int  # prompt tokens looked up in it
    prefill_tokens_computed: int
    decode_tokens: int
    steps: int  # model steps run
    pipelined_steps: int  # async_decode: steps launched before the previous one was read back
    preemptions: int


def engine_stats(
    s: Scheduler, c: HybridCache, max_num_seqs: int, steps: int, pipelined_steps: int
) -> EngineStats:
    """The snapshot of an engine's scheduler ``s`` and cache ``c``, with its ``max_num_seqs`` and
    its step counters."""
    live = list(s.waiting) + s.running
    return EngineStats(
        waiting=len(s.waiting),
        running=len(s.running),
        prefilling=sum(r.in_prefill for r in s.running),
        waiting_for_kv=len(s.waiting_for_kv),
        kv_arrived=len(s.arrived),
        prefilled=len(s.prefilled),
        pending_tokens=sum(r.num_pending for r in live),
        max_num_seqs=max_num_seqs,
        free_slots=c.num_free_slots,
        cache_usage=c.usage(),
        cache_hit_tokens=c.hits,
        cache_query_tokens=c.queries,
        prefill_tokens_computed=s.num_prefill_tokens_computed,
        decode_tokens=s.num_decode_tokens,
        steps=steps,
        pipelined_steps=pipelined_steps,
        preemptions=s.num_preemptions,
    )
