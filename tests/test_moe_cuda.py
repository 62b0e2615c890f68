"""The MoE's GPU paths against the reference loop on a GPU (skipped without CUDA): the per-pair
kernels (a few rows), the Triton grouped GEMM (up to 8192 pairs) and ``torch._grouped_mm`` (above),
in bf16 on a MoE of 64 experts; each path captured in a CUDA graph and replayed on new inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prfaas.model import moe_grouped
from prfaas.model.config import PRESETS
from prfaas.model.layers import SparseMoE

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or not moe_grouped.capturable(torch.bfloat16, torch.device("cuda")),
    reason="needs a Hopper GPU (bf16 grouped GEMMs)",
)

CFG = dataclasses.replace(
    PRESETS["tiny"], num_experts=64, num_experts_per_token=6, hidden_size=256,
    moe_intermediate_size=128,
)  # fmt: skip


def _moe() -> SparseMoE:
    dev = "cuda"
    with torch.device(dev):
        moe = SparseMoE(CFG)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for n, p in moe.named_parameters():
            scale = 0.05 if n.endswith("e_score_correction_bias") else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, device=dev, generator=g) * scale)
    moe = moe.to(torch.bfloat16)
    moe.gate.float()  # the router in fp32, as built for serving
    moe.pack_experts()
    return moe


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("tokens", [1, 5, 40, 700, 1500])  # pairs: 6, 30 | 240, 4200 | 9000
@torch.inference_mode()
def test_gpu_paths_match_reference_and_replay(tokens):
    moe = _moe()
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, CFG.hidden_size, device="cuda", generator=g).bfloat16()
    got, ref = moe.forward_grouped(x), moe.forward_reference(x)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) < 1.5e-2, _rel(got, ref)  # two bf16 computations of the same function
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe.forward_grouped(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.forward_grouped(x)
    for _ in range(2):
        x.copy_(torch.randn(tokens, CFG.hidden_size, device="cuda", generator=g).bfloat16())
        graph.replay()
        torch.testing.assert_close(out, moe.forward_grouped(x), rtol=0, atol=0)
