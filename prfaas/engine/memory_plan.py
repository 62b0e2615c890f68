"""Sizing the cache from the GPU's free memory (as vLLM's ``gpu_memory_utilization``).

After the model is on the device, :func:`plan_memory` runs one peak forward (a prefill of the
step's whole token budget on a throw-away cache) and records the most memory it took on top of
the weights. Of ``utilization * total`` device bytes, what the weights (and the stacked copies the
first forward caches), that peak, a reserve for CUDA-graph pools and the memory outside PyTorch's
allocator leave is the cache budget. ``max_num_seqs`` KDA state slots come first (fixed bytes per
request: fp32 recurrent states and conv states of every KDA layer), then state checkpoints of the
prefix cache (``checkpoint_fraction`` of the rest), then paged MLA blocks. Units: bytes, tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from prfaas.cache.hybrid import CacheConfig, HybridCache
from prfaas.model.batch import SeqInput
from prfaas.model.config import ModelConfig
from prfaas.model.model import HybridForCausalLM

GRAPH_RESERVE_BYTES = 2 << 30  # captured decode graphs' pool: logits buffers of every bucket


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int  # device memory
    utilization: float
    weights_bytes: int  # allocated after the profile run: weights and cached stacked weights
    peak_forward_bytes: int  # a prefill of ``profile_tokens`` tokens, above the weights
    profile_tokens: int
    non_torch_bytes: int  # used on the device outside PyTorch's allocator (context, libraries)
    graph_reserve_bytes: int
    cache_bytes: int  # the budget the cache was sized from
    state_bytes_per_seq: int  # KDA recurrent + conv states of one request, all layers
    block_bytes: int  # one MLA block, all MLA layers
    cache_config: CacheConfig

    @property
    def num_tokens(self) -> int:
        """MLA positions the paged blocks hold."""
        return self.cache_config.num_blocks * self.cache_config.block_size

    def max_seqs_at(self, context: int) -> int:
        """Requests of ``context`` tokens that fit at once: limited by the state slots and by the
        MLA blocks."""
        per = -(-context // self.cache_config.block_size)
        return min(self.cache_config.max_seqs, self.cache_config.num_blocks // max(per, 1))

    def summary(self) -> dict:
        d = asdict(self)
        d["cache_config"] = asdict(self.cache_config)
        d["num_tokens"] = self.num_tokens
        return d


def size_cache(
    model: ModelConfig,
    base: CacheConfig,
    budget: int,
    dtype_bytes: int = 2,
    checkpoint_fraction: float = 0.25,
) -> CacheConfig:
    """``base`` with its checkpoints and MLA blocks sized to ``budget`` bytes: ``base.max_seqs``
    state slots first, ``checkpoint_fraction`` of the rest for checkpoints, then blocks. Raises
    ValueError when the slots alone do not fit."""
    state = model.kda_state_bytes(dtype_bytes)
    block = base.block_size * model.mla_bytes_per_token(dtype_bytes)
    left = budget - base.max_seqs * state
    if left <= 0:
        raise ValueError(
            f"{budget / 2**30:.2f} GiB left for the cache cannot hold {base.max_seqs} request "
            f"states of {state / 2**20:.1f} MiB (lower max_num_seqs or raise "
            f"gpu_memory_utilization)"
        )
    n_ckpt = max(1, int(left * checkpoint_fraction) // state) if state else 1
    n_blocks = (left - (n_ckpt * state if state else 0)) // max(block, 1)
    if n_blocks < 1:
        raise ValueError("no memory left for MLA blocks")
    return CacheConfig(
        block_size=base.block_size,
        num_blocks=int(n_blocks),
        max_seqs=base.max_seqs,
        checkpoint_interval=base.checkpoint_interval,
        num_checkpoints=int(n_ckpt),
        enable_prefix_cache=base.enable_prefix_cache,
    )


@torch.inference_mode()
def profile_peak_forward(model: HybridForCausalLM, tokens: int, block_size: int = 16) -> int:
    """Bytes a prefill of ``tokens`` tokens allocates above what was allocated before it (the
    throw-away cache it writes excluded)."""
    dev = model.lm_head.weight.device
    cfg = model.kv_geometry  # a tensor-parallel rank's cache holds its heads only
    cache = HybridCache(
        cfg,
        CacheConfig(block_size, -(-tokens // block_size) + 1, 1, num_checkpoints=1),
        dev,
        model.lm_head.weight.dtype,
    )
    torch.cuda.synchronize(dev)
    ids = torch.arange(tokens) % min(cfg.vocab_size, 250)
    blocks = list(range(-(-tokens // block_size)))
    model.step([SeqInput(ids, 0, blocks, 0)], cache.tensors)  # first run: cached weights, autotune
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    model.step([SeqInput(ids, 0, blocks, 0)], cache.tensors)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del cache
    torch.cuda.empty_cache()
    return int(peak)


def plan_memory(
    model: HybridForCausalLM,
    base: CacheConfig,
    utilization: float = 0.9,
    profile_tokens: int = 8192,
    graph_reserve_bytes: int = GRAPH_RESERVE_BYTES,
    checkpoint_fraction: float = 0.25,
) -> MemoryPlan:
    """The cache ``base`` resized to the device's memory: ``base.max_seqs`` slots, blocks and
    checkpoints from what is left (block size, checkpoint interval and prefix caching kept).
    Raises ValueError when the state slots alone do not fit."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    dev = model.lm_head.weight.device
    if dev.type != "cuda":
        raise ValueError("memory planning measures a CUDA device")
    peak = profile_peak_forward(model, profile_tokens, base.block_size)
    free, total = torch.cuda.mem_get_info(dev)
    allocated = torch.cuda.memory_allocated(dev)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(dev))
    budget = int(utilization * total) - allocated - peak - non_torch - graph_reserve_bytes
    dtype_bytes = model.lm_head.weight.element_size()
    geometry = model.kv_geometry  # per rank under tensor parallelism
    cc = size_cache(geometry, base, budget, dtype_bytes, checkpoint_fraction)
    state = geometry.kda_state_bytes(dtype_bytes)
    block = base.block_size * geometry.mla_bytes_per_token(dtype_bytes)
    return MemoryPlan(
        total_bytes=int(total),
        utilization=utilization,
        weights_bytes=int(allocated),
        peak_forward_bytes=peak,
        profile_tokens=profile_tokens,
        non_torch_bytes=int(non_torch),
        graph_reserve_bytes=graph_reserve_bytes,
        cache_bytes=int(budget),
        state_bytes_per_seq=int(state),
        block_bytes=int(block),
        cache_config=cc,
    )
