"""The engine's configuration (``EngineConfig``): role, model, device, batching and cache sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prfaas.cache.hybrid import CacheConfig
from prfaas.engine.schedule_types import SchedulerConfig

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
    cuda_graphs: bool = True  # decode-only steps replay captured CUDA graphs (CUDA)
    # CUDA with num_blocks None: the cache takes this fraction of device memory less the weights
    # and a profiled peak forward (prfaas.engine.memory_plan)
    gpu_memory_utilization: float = 0.9
    # greedy decode-only steps: launch step k+1 (its input tokens taken on the device from step k)
    # before step k's tokens are read back, so the host's work overlaps the GPU's; outputs come
    # one step() call later
    async_decode: bool = True
    # ranks of one instance (vLLM's name): heads, MLP widths and experts split over that many
    # processes (prfaas.model.tp; docs/tensor_parallel.md). > 1: no CUDA graphs, no async_decode
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
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

    def scheduler_config(self, stop_ids: frozenset[int]) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            stop_ids=stop_ids,
        )
