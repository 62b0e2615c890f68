"""Every Triton kernel of the GPU path compiles for an H100 (sm_90), checked on a machine without
a GPU: the interpreter tests run the kernels' Python, which accepts programs the compiler refuses
(a variable that changes type between branches, say). Each public wrapper is called once under
the interpreter with its launches recorded; each launch is then compiled to a cubin with the
argument types and constants it had."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from prfaas.model import moe_kernels, moe_ops, triton_ops
from prfaas.model.config import PRESETS

pytestmark = pytest.mark.skipif(
    triton_ops.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (conftest.py turns it on where there is no GPU)",
)

_DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}


class _Recorder:
    """Stands in for a kernel: records each launch's arguments, then runs the kernel."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spec(kernel, args: tuple, kwargs: dict) -> dict:
    """A launch as (module, kernel name, argument types, constants, aligned arguments, options)."""
    import triton

    fn = kernel.fn
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args, strict=False)) | kwargs
    signature, constexprs, aligned = {}, {}, []
    for i, p in enumerate(params):
        v = bound.get(p.name, p.default)
        if p.annotation is triton.language.constexpr or p.annotation == "tl.constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[v.dtype]
            aligned.append(i)  # torch's allocations are 16-byte aligned
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v and v % 16 == 0:  # what Triton specialises at launch
                aligned.append(i)
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} = {v!r}")
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    return {
        "module": fn.__module__,
        "name": fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "aligned": aligned,
        "options": options,
    }


# compiled in a fresh interpreter: with TRITON_INTERPRET set, the kernels are interpreted objects
_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for spec in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["aligned"]}
    src = ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"],
                    attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
    assert out.asm["cubin"]
    print("compiled", spec["name"], flush=True)
"""


def _compile(specs: list[dict]) -> str:
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def _launches(monkeypatch, module, run) -> list:
    launches: list = []
    for name, obj in vars(module).copy().items():
        if name.endswith("_kernel"):
            monkeypatch.setattr(module, name, _Recorder(obj, launches))
    run()
    return launches


def _ops_calls() -> None:
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(5, 96, generator=g).to(bf)
    w = torch.randn(96, generator=g).to(bf)
    triton_ops.rms_norm(x, w, 1e-5)
    triton_ops.rms_norm(x, w, 1e-5, residual=x)
    triton_ops.rms_norm(x.float(), w, 1e-5, residual=x, out_dtype=bf)  # fp32 residual
    triton_ops.rms_norm_gated(x, x, w, 1e-5, bf)
    triton_ops.silu_mul(torch.randn(5, 2 * 96, generator=g).to(bf))
    triton_ops.silu_mul(torch.randn(5, 2 * 96, generator=g).to(bf), row_scale=torch.rand(5))
    W, k = 64, 4
    big = torch.randn(2, 7, 3 * W + 16, generator=g).to(bf)
    cw = torch.randn(3 * W, k, generator=g).to(bf)
    state = torch.randn(2, 3 * W, k - 1, generator=g).to(bf)
    triton_ops.causal_conv(big[..., : 3 * W], cw, state, parts=3)
    triton_ops.causal_conv(big[..., : 3 * W], cw, None, parts=3)
    slots_state = torch.randn(4, 3 * W, k - 1, generator=g)
    triton_ops.conv_update(
        big[:, 0, : 3 * W], slots_state, cw, torch.tensor([2, 0]), torch.tensor([1, 0]), parts=3
    )


def check_compiles(monkeypatch, module, run, min_kernels: int) -> None:
    """Record the launches ``run()`` makes of ``module``'s kernels; compile each variant."""
    launches = _launches(monkeypatch, module, run)
    specs = {}
    for kernel, args, kwargs in launches:
        spec = _spec(kernel, args, kwargs)
        specs.setdefault(repr((spec["name"], spec["constexprs"])), spec)  # one per variant
    names = {s["name"] for s in specs.values()}
    assert len(names) >= min_kernels, names
    out = _compile(list(specs.values()))
    assert out.count("compiled") == len(specs)


def test_kernels_compile_for_sm90(monkeypatch):
    check_compiles(monkeypatch, triton_ops, _ops_calls, min_kernels=5)


def _moe_calls() -> None:
    from prfaas.model.materialize import random_model

    moe = random_model(PRESETS["tiny"], "cpu", torch.bfloat16).model.layers[1].block_sparse_moe
    enabled = triton_ops.enabled
    triton_ops.enabled = lambda t: True
    try:
        moe_ops.GROUPED_IMPL = "grouped_mm"
        for n in (6, 40):  # the per-pair path, then the permuted one (grouped GEMMs as loops)
            moe.forward(torch.randn(n, PRESETS["tiny"].hidden_size).to(torch.bfloat16))
        moe_ops.GROUPED_IMPL = "triton"  # the permuted path's Triton grouped GEMM
        moe.forward(torch.randn(40, PRESETS["tiny"].hidden_size).to(torch.bfloat16))
        moe.forward(torch.randn(80, PRESETS["tiny"].hidden_size).to(torch.bfloat16))  # fp32 GEMM
    finally:
        triton_ops.enabled = enabled
        moe_ops.GROUPED_IMPL = "auto"


def test_moe_kernels_compile_for_sm90(monkeypatch):
    check_compiles(monkeypatch, moe_kernels, _moe_calls, min_kernels=5)
