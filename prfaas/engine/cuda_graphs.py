"""CUDA graphs of the decode step: one graph per (batch bucket, context bucket), captured on first
use, replayed with static input buffers that each step fills with one host-to-device copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prfaas.model.batch import CacheTensors
from prfaas.model.model import DecodeBatch, HybridForCausalLM

# order of the int64 fields packed into one buffer (block tables follow)
_FIELDS = ("tokens", "slots", "new_rows", "lengths", "valid")


def pack_views(buf: torch.Tensor, batch: int, blocks: int) -> DecodeBatch:
    """Views of a flat int64 buffer of batch * (5 + blocks) elements as a DecodeBatch."""
    if buf.numel() != batch * (len(_FIELDS) + blocks):
        raise ValueError(f"buffer of {buf.numel()} elements does not hold {batch} x {blocks}")
    parts = buf.split([batch] * len(_FIELDS) + [batch * blocks])
    views = dict(zip(_FIELDS, parts[:-1], strict=True))
    return DecodeBatch(block_tables=parts[-1].view(batch, blocks), **views)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    staging: torch.Tensor  # pinned host buffer
    inputs: torch.Tensor  # device buffer the graph reads
    logits: torch.Tensor  # device buffer the graph writes
    copied: torch.cuda.Event  # the last staging -> inputs copy has been done


class DecodeGraphs:
    """Captured decode graphs keyed by (batch, blocks). The graphs hold the addresses of the cache
    tensors and the weights: a new cache drops them all (weights must not be replaced)."""

    def __init__(self, model: HybridForCausalLM) -> None:
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._pool = None
        self._cache_key: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def buckets(self) -> list[tuple[int, int]]:
        """The (batch, blocks) buckets captured so far."""
        return list(self._graphs)

    def replay_seconds(self, batch: int, blocks: int, iters: int = 20) -> float:
        """GPU time of one replay of a captured graph (CUDA events, mean of ``iters`` back-to-back
        replays of the last inputs; they update the cache like decode steps do): the decode step
        without the host's share of the engine step."""
        g = self._graphs[(batch, blocks)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.graph.replay()
        start.record()
        for _ in range(iters):
            g.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    @staticmethod
    def _key_of(cache: CacheTensors) -> tuple[int, ...]:
        ts = [*cache.mla_kv, *cache.kda_state, *cache.conv_state]
        return (cache.block_size, *(t.data_ptr() for t in ts))

    def run(
        self,
        packed: torch.Tensor,
        batch: int,
        blocks: int,
        cache: CacheTensors,
        device_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay (capturing first if needed) the graph for ``packed`` (host int64, see
        :func:`pack_views`); returns the (batch, vocab) logits buffer (overwritten next replay).
        ``device_tokens``: the first rows' input tokens, taken on the device instead."""
        key = self._key_of(cache)
        if key != self._cache_key:
            self._graphs.clear()
            self._pool = torch.cuda.graph_pool_handle()
            self._cache_key = key
        g = self._graphs.get((batch, blocks))
        if g is None:
            g = self._capture(packed, batch, blocks, cache)
            self._graphs[(batch, blocks)] = g
        # the pinned staging buffer is copied asynchronously: it must not be overwritten before
        # the previous step's copy has run (a caller need not synchronise between steps)
        g.copied.synchronize()
        g.staging.copy_(packed)
        g.inputs.copy_(g.staging, non_blocking=True)
        g.copied.record()
        if device_tokens is not None:  # the tokens field leads the packed buffer
            g.inputs[: device_tokens.numel()].copy_(device_tokens)
        g.graph.replay()
        return g.logits

    def _capture(
        self, packed: torch.Tensor, batch: int, blocks: int, cache: CacheTensors
    ) -> _Captured:
        dev = self.model.lm_head.weight.device
        staging = torch.empty(packed.numel(), dtype=torch.long, pin_memory=True)
        inputs = packed.to(dev)
        views = pack_views(inputs, batch, blocks)
        views.valid.zero_()  # warm-up runs write back what they read: the cache is unchanged
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # kernel autotuning and library handles before the capture
                self.model.decode(views, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.decode(views, cache)
        return _Captured(graph, staging, inputs, logits, torch.cuda.Event())
