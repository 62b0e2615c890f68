"""The MoE's Triton kernels (prfaas.model.moe_kernels) against the readable reference, on the CPU
under Triton's interpreter (set in conftest.py): the fused router (logits, sigmoid, biased top-k,
renormalisation), the per-pair path of a few decode rows (gate|up with SiLU and the routing weight
in one kernel, down with the k choices and the shared expert summed in one kernel), and the
Triton grouped GEMM of the permuted path (rows gathered inside the kernel)."""

from __future__ import annotations

import os

import pytest
import torch

from prfaas.model import moe_grouped, moe_ops, moe_pairs, triton_ops
from prfaas.model.config import PRESETS
from prfaas.model.model import HybridForCausalLM

pytestmark = pytest.mark.skipif(
    triton_ops.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (conftest.py turns it on where there is no GPU)",
)


def _moe(seed: int = 0, **kw):
    cfg = PRESETS["tiny"]
    if kw:
        cfg = type(cfg)(**{**cfg.__dict__, **kw})
    m = HybridForCausalLM(cfg).init_weights(seed)
    moe = m.model.layers[1].block_sparse_moe
    with torch.no_grad():  # a bias that changes choices (the reference draws it zero)
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.num_experts) * 0.05)
    return moe


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setattr(triton_ops, "enabled", lambda t: True)


@pytest.mark.parametrize("rows", [1, 5, 70])  # the GEMV logits, then the fp32 GEMM ones
def test_router_kernels_match_reference(kernels_on, rows, monkeypatch):
    moe = _moe(1, num_experts=24, num_experts_per_token=5)
    x = torch.randn(rows, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(2))
    g = moe.gate
    w, idx = moe_ops.route(x, g.weight, g.e_score_correction_bias, 5, True, 2.5)
    monkeypatch.setattr(triton_ops, "enabled", lambda t: False)
    w_ref, idx_ref = moe_ops.route(x, g.weight, g.e_score_correction_bias, 5, True, 2.5)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(idx, idx_ref)  # the same experts, largest biased score first
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_pair_path_with_shared_expert_matches_reference_loop(kernels_on, rows):
    moe = _moe(2)
    x = torch.randn(rows, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    assert rows * moe.top_k <= moe_ops.SMALL_PAIRS
    with torch.no_grad():
        got = moe.forward_grouped(x)  # router kernels + the two per-pair kernels
        ref = moe.forward_reference(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_pair_path_without_shared_expert(kernels_on):
    moe = _moe(3)
    x = torch.randn(4, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(4))
    w13, w2 = moe.pack_experts()
    with torch.no_grad():
        w, idx = moe.route(x)
        got = moe_pairs.pair_experts(x, w, idx, w13, w2)
        ref = moe.forward_reference(x) - moe.shared_experts(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_align_blocks_pads_each_expert_to_whole_blocks():
    idx = torch.tensor([[3, 0], [3, 1], [0, 2], [5, 3]])
    pairs, be = moe_grouped.align_blocks(idx, 6, bm=2)
    P = idx.numel()
    assert be.shape[0] == -(-P // 2) + 6 and pairs.shape[0] == 2 * be.shape[0]
    blocks = pairs.view(-1, 2)
    seen = []
    for b, e in enumerate(be.tolist()):
        rows = [p for p in blocks[b].tolist() if p < P]
        if e < 0:
            assert not rows
            continue
        assert rows and all(idx.reshape(-1)[p] == e for p in rows)
        seen += rows
    assert sorted(seen) == list(range(P))  # every pair once
    assert be.tolist()[:5] == [0, 1, 2, 3, 3]  # expert 3 has 3 pairs: two blocks


def test_triton_grouped_gemm_matches_reference_loop(kernels_on):
    moe = _moe(4)
    H = moe.gate.weight.shape[1]
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(5))
    w13, w2 = moe.pack_experts()
    cfg = {"BM": 16, "BN": 32, "BK": 32, "num_warps": 4, "num_stages": 2}
    with torch.no_grad():
        w, idx = moe.route(x)
        y = moe_grouped.fused_experts(x, w, idx, w13, w2, config=cfg)  # pair order, weighted
        got = y.view(9, moe.top_k, H).sum(1)
        ref = moe.forward_reference(x) - moe.shared_experts(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bm", [4, 16])
def test_align_kernels_equal_the_torch_ops(kernels_on, bm, monkeypatch):
    g = torch.Generator().manual_seed(6)
    idx = torch.stack([torch.randperm(24, generator=g)[:5] for _ in range(37)])  # 185 pairs
    pairs, be = moe_grouped.align_blocks(idx, 24, bm)  # the Triton kernels
    monkeypatch.setattr(triton_ops, "enabled", lambda t: False)
    ref_pairs, ref_be = moe_grouped.align_blocks(idx, 24, bm)  # sort, searchsorted, scatter
    assert torch.equal(pairs, ref_pairs)
    assert be.tolist() == ref_be.tolist()
