"""Runs one engine step on the model: decode-only steps take the static-shape decode path (CUDA
graphs on a GPU, padded to batch and context buckets), everything else the eager ``model.step``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from prfaas.engine.cuda_graphs import DecodeGraphs, pack_views
from prfaas.model import moe_grouped
from prfaas.model.batch import CacheTensors, SeqInput
from prfaas.model.model import HybridForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_BLOCKS = 16  # smallest context bucket, in cache blocks


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (n itself beyond the largest)."""
    for b in buckets:
        if b >= n:
            return b
    return n


def blocks_bucket(n: int, total: int) -> int:
    """Context bucket in blocks: the smallest m * 2**k >= n with m in 4..7 (steps of at most 25%),
    at least MIN_BLOCKS and at most ``total`` (n itself when n exceeds total)."""
    b, k = MIN_BLOCKS, 2
    while b < n:
        m = b >> k
        b = (m + 1) << k
        if m == 7:  # 8 * 2**k == 4 * 2**(k+1)
            k += 1
    return max(n, min(b, total))


def pack_decode(
    seqs: Sequence[SeqInput], cache: CacheTensors, batch: int, blocks: int
) -> torch.Tensor:
    """Host int64 buffer (see ``pack_views``) of a decode step padded to ``batch`` rows and
    ``blocks`` blocks per row. Padding rows use state slots and cache rows no real row uses."""
    n = len(seqs)
    num_slots = cache.kda_state[0].shape[0] if cache.kda_state else batch
    total_rows = cache.mla_kv[0].shape[0] * cache.block_size if cache.mla_kv else batch
    if batch < n or batch > num_slots or batch > total_rows:
        raise ValueError(f"cannot pad {n} rows to {batch} ({num_slots} state slots)")
    bs = cache.block_size
    buf = np.zeros(batch * (5 + blocks), dtype=np.int64)
    tokens, slots, new_rows, lengths, valid = buf[: 5 * batch].reshape(5, batch)
    tables = buf[5 * batch :].reshape(batch, blocks)
    # whole columns at once; the loop only copies block tables (this runs every decode step)
    starts = [s.start for s in seqs]
    tokens[:n] = torch.cat([s.token_ids for s in seqs]).numpy()
    slots[:n] = [s.slot for s in seqs]
    last = []
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        bt, nb = s.block_table, start // bs + 1  # blocks of positions 0..start
        if len(bt) < nb or nb > blocks:
            raise ValueError(
                f"row {i}: position {start} needs {nb} blocks; the table has {len(bt)}, "
                f"the bucket {blocks}"
            )
        tables[i, :nb] = bt[:nb]
        last.append(bt[nb - 1])
    st = np.asarray(starts, dtype=np.int64)
    new_rows[:n] = np.asarray(last, dtype=np.int64) * bs + st % bs
    lengths[:n] = st + 1
    valid[:n] = 1
    if batch > n:
        used_slots, used_rows = set(slots[:n].tolist()), set(new_rows[:n].tolist())
        free_slots = [s for s in range(num_slots) if s not in used_slots][: batch - n]
        free_rows, r = [], total_rows - 1
        while len(free_rows) < batch - n:
            if r not in used_rows:
                free_rows.append(r)
            r -= 1
        slots[n:] = free_slots
        new_rows[n:] = free_rows
        lengths[n:] = 1
        tables[n:, 0] = np.asarray(free_rows) // bs
    return torch.from_numpy(buf)


class ModelRunner:
    """Dispatches engine steps. ``cuda_graphs``: replay captured graphs for decode-only steps
    (CUDA; MoE models where ``moe_grouped.capturable``: bf16 on Hopper). ``pad`` (default: with graphs) pads decode steps to buckets."""

    def __init__(
        self, model: HybridForCausalLM, cuda_graphs: bool = True, pad: bool | None = None
    ) -> None:
        self.model = model
        dev = model.lm_head.weight.device
        w = model.lm_head.weight
        moe_ok = not model.config.num_experts or moe_grouped.capturable(w.dtype, dev)
        self.graphs = DecodeGraphs(model) if cuda_graphs and dev.type == "cuda" and moe_ok else None
        self.pad = self.graphs is not None if pad is None else pad
        self.num_graph_steps = 0
        self.num_decode_steps = 0
        self.num_eager_steps = 0

    @staticmethod
    def is_decode_only(seqs: Sequence[SeqInput]) -> bool:
        return bool(seqs) and all(s.token_ids.numel() == 1 and s.start > 0 for s in seqs)

    def step(
        self,
        seqs: list[SeqInput],
        cache: CacheTensors,
        layer_callback: Callable[[int], None] | None = None,
        device_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as ``HybridForCausalLM.step``. ``device_tokens`` (decode-only steps):
        the rows' input tokens, already on the device (those in ``seqs`` are ignored)."""
        if layer_callback is not None or not self.is_decode_only(seqs):
            if device_tokens is not None:
                raise ValueError("device_tokens apply to decode-only steps")
            self.num_eager_steps += 1
            return self.model.step(seqs, cache, layer_callback)
        return self.decode(seqs, cache, device_tokens)

    def decode(
        self,
        seqs: Sequence[SeqInput],
        cache: CacheTensors,
        device_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A decode-only step through the static-shape path; returns (len(seqs), vocab) fp32."""
        if not self.is_decode_only(seqs):
            raise ValueError("decode() takes one new token per sequence, each after position 0")
        n = len(seqs)
        bs = cache.block_size
        need = max(s.start // bs + 1 for s in seqs)
        total = cache.mla_kv[0].shape[0] if cache.mla_kv else need
        num_slots = cache.kda_state[0].shape[0] if cache.kda_state else n
        if self.pad:
            batch = min(bucket(n, BATCH_BUCKETS), max(num_slots, n))
            blocks = blocks_bucket(need, total)
        else:
            batch, blocks = n, need
        packed = pack_decode(seqs, cache, batch, blocks)
        self.num_decode_steps += 1
        if self.graphs is not None:
            self.num_graph_steps += 1
            return self.graphs.run(packed, batch, blocks, cache, device_tokens)[:n].clone()
        dev = self.model.lm_head.weight.device
        b = pack_views(packed.to(dev, non_blocking=True), batch, blocks)
        if device_tokens is not None:
            b.tokens[:n] = device_tokens
        return self.model.decode(b, cache)[:n]
