"""A bf16 model's precision: the residual stream in fp32, the logits from an fp32-output GEMM
(``HybridForCausalLM.residual_dtype`` / ``fp32_logits``), and the PyTorch path rounding where the
fused kernels do. Compared with a fp32 copy holding the same (bf16) weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from prfaas.engine.model_runner import ModelRunner
from prfaas.model import layers
from prfaas.model.batch import CacheTensors, SeqInput
from prfaas.model.config import PRESETS
from prfaas.model.layers import linear_fp32_out
from prfaas.model.model import HybridForCausalLM

# dense (no routers: a bf16 run and a fp32 run can't part ways on an expert choice)
DENSE = dataclasses.replace(PRESETS["tiny"], num_experts=0, name="tiny-dense")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def pair():
    m16 = HybridForCausalLM(DENSE).init_weights(7).to(torch.bfloat16).eval()
    return m16, copy.deepcopy(m16).float()


def test_linear_fp32_out_is_the_fp32_product(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).bfloat16()
    w = (torch.randn(1000, 64, generator=g) * 0.5).bfloat16()
    monkeypatch.setattr(layers, "LOGITS_CHUNK", 300)  # chunks that do not divide the rows
    got = linear_fp32_out(x, w)
    exact = (x.double() @ w.double().T).float()
    assert got.dtype == torch.float32 and got.shape == (5, 1000)
    err = float((got - exact).abs().max())
    err_bf16 = float((torch.nn.functional.linear(x, w).float() - exact).abs().max())
    assert err < 1e-5 < err_bf16 / 100, (err, err_bf16)
    f = linear_fp32_out(x.float(), w.float())  # fp32 model: one plain GEMM
    torch.testing.assert_close(f, exact, rtol=1e-5, atol=1e-5)


def test_bf16_model_keeps_fp32_stream_and_is_closer_to_fp32(pair):
    m16, m32 = pair
    assert m16.dtypes() == (torch.bfloat16, torch.float32)
    assert m32.dtypes() == (torch.float32, torch.float32)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m32(ids)
        new = m16(ids)
        try:
            m16.residual_dtype, m16.fp32_logits = None, False
            assert m16.dtypes() == (torch.bfloat16, torch.bfloat16)
            old = m16(ids)
        finally:
            m16.residual_dtype, m16.fp32_logits = torch.float32, True
    assert new.dtype == torch.float32
    e_new, e_old = _rel(new, ref), _rel(old, ref)
    assert e_new < 0.9 * e_old, (e_new, e_old)


def _cache(cfg, dtype, num_blocks=16, block_size=8, slots=4):
    return CacheTensors(
        block_size,
        [torch.zeros(num_blocks, block_size, cfg.latent_dim, dtype=dtype) for _ in cfg.mla_layers],
        [
            torch.zeros(slots, cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_head_dim)
            for _ in cfg.kda_layers
        ],
        [
            torch.zeros(slots, 3, cfg.kda_width, cfg.short_conv_kernel_size - 1, dtype=dtype)
            for _ in cfg.kda_layers
        ],
    )


def test_bf16_step_and_static_decode_follow_forward(pair):
    """The cached step (prefill, then decode) and the static-shape decode (what CUDA graphs
    capture) of a bf16 model, against its cache-free forward and against each other."""
    m16, _ = pair
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m16(ids[None])[0]
        caches = [_cache(DENSE, torch.bfloat16) for _ in range(2)]
        runner = ModelRunner(m16, cuda_graphs=False, pad=True)
        bt = [3, 0, 5, 9]
        for c in caches:
            out = m16.step([SeqInput(ids[:20], 0, bt, 1)], c)
            assert _rel(out[0], ref[19]) < 2e-2
        for p in range(20, 30):
            a = m16.step([SeqInput(ids[p : p + 1], p, bt, 1)], caches[0])[0]
            b = runner.step([SeqInput(ids[p : p + 1], p, bt, 1)], caches[1])[0]
            assert a.dtype == b.dtype == torch.float32
            assert _rel(a, ref[p]) < 2e-2
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
