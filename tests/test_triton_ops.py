"""The fused Triton kernels of the GPU path against the torch modules they replace (run on the CPU
under Triton's interpreter, set in conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from prfaas.model import triton_ops
from prfaas.model.checkpoint import build_model
from prfaas.model.layers import RMSNorm

pytestmark = pytest.mark.skipif(
    triton_ops.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (conftest.py turns it on where there is no GPU)",
)


def test_model_does_not_use_kernels_on_cpu():
    assert not triton_ops.enabled(torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_module(dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    D = 96  # not a power of two: the block is masked
    norm = RMSNorm(D, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    x = torch.randn(7, 3, D, generator=g).to(dtype)
    res = torch.randn(7, 3, D, generator=g).to(dtype) if with_residual else None
    y, s = triton_ops.rms_norm(x, norm.weight.to(dtype), 1e-6, res)
    want_s = x + res if with_residual else x
    if dtype == torch.float32:
        assert torch.equal(s, want_s)
    else:  # the interpreter narrows fp32 to bf16 by truncation (the GPU rounds): one ulp
        torch.testing.assert_close(s, want_s, rtol=1e-2, atol=0)
    want = norm.to(dtype)(want_s)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)


def test_rms_norm_fp32_residual_stream():
    """The decoder's residual stream in fp32 with bf16 layer outputs: the sum is exact in fp32
    (no rounding to bf16), the normalised output is bf16, as the module computes them."""
    g = torch.Generator().manual_seed(3)
    D = 96
    norm = RMSNorm(D, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    w = norm.weight.to(torch.bfloat16)
    x = torch.randn(7, D, generator=g)  # fp32, not representable in bf16
    delta = torch.randn(7, D, generator=g).to(torch.bfloat16)
    y, s = triton_ops.rms_norm(x, w, 1e-6, delta, out_dtype=torch.bfloat16)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(s, x + delta.float())
    want_s, want = norm.to(torch.bfloat16).add_forward(x, delta, torch.bfloat16)
    assert torch.equal(want_s, s)
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)
    y0, s0 = triton_ops.rms_norm(x, w, 1e-6, out_dtype=torch.bfloat16)
    assert s0 is x and y0.dtype == torch.bfloat16
    torch.testing.assert_close(y0, norm.to(torch.bfloat16)(x, torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_rms_norm_strided_rows():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(5, 80, generator=g)
    x = big[:, 8:72]  # rows with stride 80
    w = torch.rand(64, generator=g)
    y, _ = triton_ops.rms_norm(x, w, 1e-5)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_rms_norm_gated_matches_kda_output_norm():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 5, 32, generator=g).to(torch.bfloat16)
    gate = torch.randn(4, 2, 5, 32, generator=g).to(torch.bfloat16)
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=g) + 0.5)
    y = triton_ops.rms_norm_gated(x, gate, norm.weight, 1e-6, torch.bfloat16)
    want = (norm(x.float()) * torch.sigmoid(gate.float())).to(torch.bfloat16)
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)
    y32 = triton_ops.rms_norm_gated(x.float(), gate.float(), norm.weight, 1e-6, torch.float32)
    want32 = norm(x.float()) * torch.sigmoid(gate.float())
    torch.testing.assert_close(y32, want32, rtol=1e-5, atol=1e-5)


def test_silu_mul():
    g = torch.Generator().manual_seed(3)
    gu = torch.randn(3, 4, 2 * 1500, generator=g)  # more columns than one block
    y = triton_ops.silu_mul(gu)
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    scale = torch.rand(12, generator=g)  # one routing weight per row (the MoE's pairs)
    ys = triton_ops.silu_mul(gu.view(12, -1), row_scale=scale)
    want = (F.silu(gate) * up).view(12, -1) * scale[:, None]
    torch.testing.assert_close(ys, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_conv_update_matches_kda_conv(state_dtype):
    """One decode token through KDAAttention._conv vs the slot-indexed in-place kernel; padding
    rows leave their slots untouched."""
    model = build_model("tiny", seed=0)
    attn = next(m.self_attn for m in model.model.layers if m.kind == "kda")
    W, k = attn.W, attn.kernel
    g = torch.Generator().manual_seed(4)
    S, B = 6, 4
    state = torch.randn(S, 3, W, k - 1, generator=g).to(state_dtype)
    big = torch.randn(B, 3 * W + 5, generator=g)
    x = big[:, : 3 * W]  # strided rows, as the fused in-projection's split gives them
    slots = torch.tensor([4, 0, 2, 5])
    valid = torch.tensor([1, 1, 1, 0])
    before = state.clone()
    want_y, want_st = attn._conv(x[:, None, :], state[slots].reshape(B, 3 * W, k - 1))
    y = triton_ops.conv_update(
        x, state.view(S, 3 * W, k - 1), attn._conv_weight(), slots, valid, parts=3
    )
    assert y.shape == (3, B, W)
    got = y.permute(1, 0, 2).reshape(B, 3 * W)
    torch.testing.assert_close(got, want_y[:, 0], rtol=1e-5, atol=1e-5)
    exact = 0 if state_dtype == torch.float32 else 1e-2  # interpreter: bf16 by truncation
    for b in range(3):
        torch.testing.assert_close(
            state[slots[b]].reshape(3 * W, k - 1), want_st[b].to(state_dtype), rtol=exact, atol=0
        )
    for s in (1, 3, 5):  # untouched: never named, or a padding row's slot
        assert torch.equal(state[s], before[s])


@pytest.mark.parametrize("n", [1, 2, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv_matches_kda_conv(n, with_state):
    """A prefill chunk through KDAAttention._conv vs the kernel reading the projection's strided
    output: outputs as contiguous q/k/v planes, and the carried state (chunks shorter than the
    kernel take part of it from the previous state)."""
    model = build_model("tiny", seed=0)
    attn = next(m.self_attn for m in model.model.layers if m.kind == "kda")
    W, k = attn.W, attn.kernel
    g = torch.Generator().manual_seed(n)
    B = 2
    big = torch.randn(B, n, 3 * W + 7, generator=g)
    x = big[..., : 3 * W]  # strided rows
    state = torch.randn(B, 3 * W, k - 1, generator=g) if with_state else None
    ref_state = state if with_state else torch.zeros(B, 3 * W, k - 1)
    want_y, want_st = attn._conv(x, ref_state)
    y, fin = triton_ops.causal_conv(x, attn._conv_weight(), state, parts=3)
    assert y.shape == (3, B, n, W) and y.is_contiguous()
    got = y.permute(1, 2, 0, 3).reshape(B, n, 3 * W)
    torch.testing.assert_close(got, want_y, rtol=1e-5, atol=1e-5)
    assert torch.equal(fin, want_st)


def test_bf16_kda_conv_rounds_once_as_the_kernel():
    """In bf16 the PyTorch path's conv sums in fp32 and rounds its SiLU output once, as the
    kernel does: within one bf16 step of the kernel (the interpreter narrows by truncation)."""
    model = build_model("tiny", seed=0).to(torch.bfloat16)
    attn = next(m.self_attn for m in model.model.layers if m.kind == "kda")
    W, k = attn.W, attn.kernel
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 33, 3 * W, generator=g).bfloat16()
    state = torch.randn(2, 3 * W, k - 1, generator=g).bfloat16()
    want_y, want_st = attn._conv(x, state)
    y, fin = triton_ops.causal_conv(x, attn._conv_weight(), state, parts=3)
    got = y.permute(1, 2, 0, 3).reshape(2, 33, 3 * W)
    assert want_y.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want_y.float(), rtol=2**-7, atol=1e-6)
    assert torch.equal(fin, want_st)
