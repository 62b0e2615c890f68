"""KDA kernels: chunked == recurrent == a plain per-token loop; state carry; stability; errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prfaas.model import kda_ops
from prfaas.model.kda_ops import (
    fla_available,
    kda_chunk,
    kda_decode,
    kda_prefill,
    kda_recurrent,
)

ATOL = 1e-5


def make_inputs(
    B: int, T: int, H: int, K: int, V: int, *, gmin: float = -1.0, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.rand(B, T, H, K, generator=gen) * gmin  # in [gmin, 0]
    beta = torch.rand(B, T, H, generator=gen)
    return q, k, v, g, beta


def reference_loop(q, k, v, g, beta, scale, initial_state=None):
    """Plain per-(batch, head, token) loop of the KDA recurrence, float64."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    S_out = torch.zeros(B, H, K, V, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=torch.float64)
            if initial_state is not None:
                S = initial_state[b, h].double().clone()
            for t in range(T):
                kt = k[b, t, h].double()
                S = torch.diag(g[b, t, h].double().exp()) @ S
                S = S + float(beta[b, t, h]) * torch.outer(kt, v[b, t, h].double() - kt @ S)
                o[b, t, h] = scale * (q[b, t, h].double() @ S)
            S_out[b, h] = S
    return o, S_out


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 200])
def test_chunk_and_recurrent_match_reference_loop(T: int, with_state: bool) -> None:
    B, H, K, V = 2, 2, 16, 8
    q, k, v, g, beta = make_inputs(B, T, H, K, V, seed=T)
    s0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(1)) if with_state else None
    scale = K**-0.5
    o_ref, s_ref = reference_loop(q, k, v, g, beta, scale, s0)
    o_rec, s_rec = kda_recurrent(q, k, v, g, beta, scale=scale, initial_state=s0)
    torch.testing.assert_close(o_rec.double(), o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s_rec.double(), s_ref, atol=ATOL, rtol=0)
    for cs in (16, 32, 64):
        o_ch, s_ch = kda_chunk(q, k, v, g, beta, scale=scale, initial_state=s0, chunk_size=cs)
        assert o_ch.shape == (B, T, H, V) and s_ch.shape == (B, H, K, V)
        assert o_ch.dtype == torch.float32 and s_ch.dtype == torch.float32
        torch.testing.assert_close(o_ch.double(), o_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(s_ch.double(), s_ref, atol=ATOL, rtol=0)


def test_known_values_single_head() -> None:
    # K = V = 1 by hand: S1 = 0*e^g + b*k*(v - 0) = 0.5*1*2 = 1; o1 = 1*1 = 1.
    # S2 = 1*e^{-ln 2} = 0.5; S2 += 1*1*(4 - 0.5) -> 4; o2 = 0.5*4 = 2.
    q = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1)
    k = torch.ones(1, 2, 1, 1)
    v = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    g = torch.tensor([0.0, -math.log(2.0)]).view(1, 2, 1, 1)
    beta = torch.tensor([0.5, 1.0]).view(1, 2, 1)
    for fn in (kda_recurrent, kda_chunk):
        o, s = fn(q, k, v, g, beta, scale=1.0)
        torch.testing.assert_close(o.flatten(), torch.tensor([1.0, 2.0]))
        torch.testing.assert_close(s.flatten(), torch.tensor([4.0]))


@pytest.mark.parametrize("chunk_size", [1, 24, 48])
def test_chunk_sizes_not_multiple_of_16(chunk_size: int) -> None:
    q, k, v, g, beta = make_inputs(1, 77, 2, 8, 8, seed=3)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, scale=0.5)
    o, s = kda_chunk(q, k, v, g, beta, scale=0.5, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=0)


def test_realistic_head_dims() -> None:
    q, k, v, g, beta = make_inputs(1, 130, 2, 128, 128, seed=4)
    s0 = torch.randn(1, 2, 128, 128) * 0.1
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, scale=128**-0.5, initial_state=s0)
    o, s = kda_chunk(q, k, v, g, beta, scale=128**-0.5, initial_state=s0)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=0)


def test_split_sequence_carrying_state_equals_one_call() -> None:
    q, k, v, g, beta = make_inputs(2, 150, 2, 16, 8, seed=5)
    scale = 0.25
    o_full, s_full = kda_chunk(q, k, v, g, beta, scale=scale)
    cut = 70
    o1, s1 = kda_chunk(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], scale=scale)
    o2, s2 = kda_chunk(
        q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], scale=scale, initial_state=s1
    )
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(s2, s_full, atol=ATOL, rtol=0)
    # prefill then token-by-token decode (the serving pattern)
    o_p, s = kda_prefill(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], scale=scale)
    outs = [o_p]
    for t in range(cut, 150):
        sl = slice(t, t + 1)
        o_t, s = kda_decode(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale=scale, initial_state=s
        )
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), o_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_full, atol=ATOL, rtol=0)


def test_initial_state_not_mutated() -> None:
    q, k, v, g, beta = make_inputs(1, 40, 2, 8, 8, seed=6)
    s0 = torch.randn(1, 2, 8, 8)
    keep = s0.clone()
    kda_chunk(q, k, v, g, beta, scale=1.0, initial_state=s0)
    kda_recurrent(q, k, v, g, beta, scale=1.0, initial_state=s0)
    assert torch.equal(s0, keep)


@pytest.mark.parametrize("gmin", [-10.0, -80.0])
def test_strong_decays_stay_finite_and_agree(gmin: float) -> None:
    q, k, v, g, beta = make_inputs(1, 200, 2, 32, 16, gmin=gmin, seed=7)
    # half the channels barely decay, so the state keeps a long memory on those
    g[..., :16] *= 1e-3
    s0 = torch.randn(1, 2, 32, 16)
    o_ref, s_ref = reference_loop(q, k, v, g, beta, 32**-0.5, s0)
    for cs in (16, 64):
        o, s = kda_chunk(q, k, v, g, beta, scale=32**-0.5, initial_state=s0, chunk_size=cs)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        torch.testing.assert_close(o.double(), o_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(s.double(), s_ref, atol=ATOL, rtol=0)


def test_long_sequence_grouped_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, g, beta = make_inputs(1, 1000, 2, 16, 16, gmin=-3.0, seed=8)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, scale=0.25)
    o, s = kda_chunk(q, k, v, g, beta, scale=0.25)
    # force many small chunk groups: same result
    monkeypatch.setattr(kda_ops, "_MAX_GROUP_ELEMS", 1)
    o_g, s_g = kda_chunk(q, k, v, g, beta, scale=0.25)
    for oo, ss in ((o, s), (o_g, s_g)):
        torch.testing.assert_close(oo, o_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(ss, s_ref, atol=ATOL, rtol=0)


def test_output_dtype_follows_v_state_fp32() -> None:
    q, k, v, g, beta = make_inputs(1, 33, 2, 8, 8, seed=9)
    qb, kb, vb, bb = (x.bfloat16() for x in (q, k, v, beta))
    s0 = torch.randn(1, 2, 8, 8).bfloat16()
    o_ref, s_ref = kda_recurrent(
        qb.float(), kb.float(), vb.float(), g, bb.float(), scale=1.0, initial_state=s0.float()
    )
    for fn in (kda_chunk, kda_recurrent, kda_prefill, kda_decode):
        o, s = fn(qb, kb, vb, g, bb, scale=1.0, initial_state=s0)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        torch.testing.assert_close(o, o_ref.bfloat16())
        torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=0)


def test_dispatchers_on_cpu_use_torch_path() -> None:
    q, k, v, g, beta = make_inputs(1, 20, 2, 8, 8, seed=10)
    assert torch.equal(
        kda_prefill(q, k, v, g, beta, scale=1.0)[0], kda_chunk(q, k, v, g, beta, scale=1.0)[0]
    )
    assert torch.equal(
        kda_decode(q, k, v, g, beta, scale=1.0)[0], kda_recurrent(q, k, v, g, beta, scale=1.0)[0]
    )


def test_fla_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kda_ops, "_fla_ops", lambda: ("chunk", "recurrent"))
    monkeypatch.setenv("PRFAAS_DISABLE_FLA", "1")
    assert fla_available() is False
    monkeypatch.setenv("PRFAAS_DISABLE_FLA", "0")
    assert fla_available() is True
    monkeypatch.setattr(kda_ops, "_fla_ops", lambda: None)
    assert fla_available() is False


def test_dispatch_calls_fla_with_fla_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake fla kernels with fla's keyword interface check what the dispatchers pass."""
    calls: list[str] = []

    def fake(name):
        def fn(
            q,
            k,
            v,
            g,
            beta,
            scale=None,
            initial_state=None,
            output_final_state=False,
            use_qk_l2norm_in_kernel=False,
            **kwargs,
        ):
            calls.append(name)
            assert not kwargs, kwargs
            assert use_qk_l2norm_in_kernel is False and output_final_state is True
            assert q.dtype == k.dtype == v.dtype
            assert initial_state is None or initial_state.dtype == torch.float32
            o, s = reference_loop(q, k, v, g, beta, scale, initial_state)
            return o.to(q.dtype), s.float()  # fla returns o in q's dtype

        return fn

    monkeypatch.setattr(kda_ops, "_fla_ops", lambda: (fake("chunk"), fake("recurrent")))
    monkeypatch.setattr(kda_ops, "_use_fla", lambda t: True)
    q, k, v, g, beta = make_inputs(1, 9, 2, 8, 4, seed=11)
    s0 = torch.randn(1, 2, 8, 4)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, scale=0.3, initial_state=s0)
    o, s = kda_prefill(q, k, v, g, beta, scale=0.3, initial_state=s0)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=0)
    o, s = kda_decode(q.double(), k, v, g, beta, scale=0.3, initial_state=s0.double())
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    assert calls == ["chunk", "recurrent"]


def _bad(**over):
    q, k, v, g, beta = make_inputs(1, 4, 2, 8, 6)
    args = dict(q=q, k=k, v=v, g=g, beta=beta)
    kw = dict(scale=1.0, initial_state=None)
    for key, val in over.items():
        (args if key in args else kw)[key] = val
    return args, kw


@pytest.mark.parametrize("fn", [kda_chunk, kda_recurrent, kda_prefill, kda_decode])
@pytest.mark.parametrize(
    ("over", "msg"),
    [
        (dict(q=torch.zeros(4, 2, 8)), "q must have shape"),
        (dict(k=torch.zeros(1, 4, 2, 7)), "k must have the same shape"),
        (dict(v=torch.zeros(1, 5, 2, 6)), "v must have shape"),
        (dict(g=torch.zeros(1, 4, 2, 6)), "g must have shape"),
        (dict(beta=torch.zeros(1, 4, 2, 1)), "beta must have shape"),
        (dict(initial_state=torch.zeros(1, 2, 6, 8)), "initial_state must have shape"),
        (dict(q=torch.zeros(1, 4, 2, 8, dtype=torch.long)), "floating-point"),
        (dict(scale=float("nan")), "scale must be a finite"),
    ],
)
def test_bad_inputs_raise_value_error(fn, over, msg) -> None:
    args, kw = _bad(**over)
    with pytest.raises(ValueError, match=msg):
        fn(*args.values(), **kw)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5])
def test_bad_chunk_size(chunk_size) -> None:
    args, kw = _bad()
    with pytest.raises(ValueError, match="chunk_size"):
        kda_chunk(*args.values(), **kw, chunk_size=chunk_size)
