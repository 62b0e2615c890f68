"""Cache sizing from a byte budget (prfaas.engine.memory_plan.size_cache); the measured side
(plan_memory) needs a GPU and runs in benchmarks/engine.py."""

from __future__ import annotations

import pytest

from prfaas.cache.hybrid import CacheConfig
from prfaas.engine.memory_plan import size_cache
from prfaas.model.config import PRESETS


def test_48b_geometry_cache_split():
    cfg = PRESETS["kimi-linear-48b"]
    state = cfg.kda_state_bytes(2)  # 20 KDA layers: fp32 32x128x128 states + bf16 conv states
    assert state == 20 * (32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2)
    block = 16 * 7 * 576 * 2
    base = CacheConfig(block_size=16, num_blocks=1, max_seqs=128, checkpoint_interval=64)
    budget = 20 << 30
    cc = size_cache(cfg, base, budget)
    assert cc.max_seqs == 128 and cc.block_size == 16 and cc.checkpoint_interval == 64
    left = budget - 128 * state
    assert cc.num_checkpoints == int(left * 0.25) // state
    assert cc.num_blocks == (left - cc.num_checkpoints * state) // block
    assert cc.num_blocks * 16 >= 128 * 4096  # batch 128 at 4K context fits
    assert cc.num_blocks * block + (128 + cc.num_checkpoints) * state <= budget


def test_too_small_a_budget_is_an_error():
    base = CacheConfig(max_seqs=128)
    with pytest.raises(ValueError, match="cannot hold 128 request states"):
        size_cache(PRESETS["kimi-linear-48b"], base, 1 << 30)
