"""The paged MLA decode kernel (prfaas/model/mla_paged.py), run by the Triton interpreter on CPU,
against the PyTorch reference and against ``MLAAttention.attend_absorbed``."""

import os

# The interpreter must be on before triton is imported (and before the kernels are decorated).
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as _interp
except Exception as e:  # pragma: no cover - depends on the install
    pytest.skip(
        f"triton is not importable ({e!r}): the kernel tests need it", allow_module_level=True
    )

from prfaas.model import mla_paged as mp  # noqa: E402
from prfaas.model.config import ModelConfig  # noqa: E402
from prfaas.model.mla import MLAAttention  # noqa: E402

# Kernels are decorated by now; put the variable back so nothing collected later (e.g. fla's CUDA
# kernels in the GPU tests) is interpreted. The fixture below turns it on for these tests only.
if _PREV_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

ROOT = Path(__file__).resolve().parents[1]

# When triton was first imported with the interpreter off (by a module imported before this one,
# without conftest setting TRITON_INTERPRET), its own helpers (tl.cdiv, ...) are compiled-mode
# functions the interpreter cannot call, so the kernel tests cannot run in this process.
_INTERPRETABLE = isinstance(tl.standard.cdiv, _interp.InterpretedFunction)


def _interpreted(kernel):
    """The kernel as an InterpretedFunction, whatever the env was when mla_paged was imported
    (another module may have imported it first)."""
    if isinstance(kernel, _interp.InterpretedFunction):
        return kernel
    return _interp.InterpretedFunction(kernel.fn)


@pytest.fixture
def interpreter(monkeypatch):
    """Runs the kernels with Triton's interpreter for the duration of one test."""
    if not _INTERPRETABLE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mp, "_mla_decode_kernel", _interpreted(mp._mla_decode_kernel))
    monkeypatch.setattr(mp, "_mla_merge_kernel", _interpreted(mp._mla_merge_kernel))
    try:
        int(np.array([1]))
    except TypeError:
        # numpy >= 2.4 refuses int() of a 1-element array, which triton 3.6's interpreter does for
        # loop bounds loaded from memory (triton-lang/triton#9171); patch that one conversion.
        orig = _interp._patch_lang_tensor

        def patched(tensor, scope):
            orig(tensor, scope)
            scope.set_attr(
                tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
            )

        monkeypatch.setattr(_interp, "_patch_lang_tensor", patched)

    # The interpreter multiplies bf16 dot operands as their raw uint16 bits; widen them to fp32
    # first (exact products, fp32 sums: what the GPU's bf16 MMA with fp32 accumulation computes).
    orig_dot = _interp.InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (
            self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b)
        )
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(_interp.InterpreterBuilder, "create_dot", dot)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _case(B, H, R, P, bs, lengths, dtype=torch.float32, seed=0, spare_blocks=3):
    """Random inputs: shuffled (non-contiguous) block tables with unused entries set to -1."""
    g = torch.Generator().manual_seed(seed)
    NB = _cdiv(max(lengths), bs) + 1  # a spare column: the table is wider than any row needs
    pool = B * NB + spare_blocks
    bt = torch.randperm(pool, generator=g)[: B * NB].view(B, NB).clone()
    for b, L in enumerate(lengths):
        bt[b, _cdiv(L, bs) :] = -1
    cache = torch.randn(pool * bs, R + P, generator=g).to(dtype)
    q_lat = torch.randn(B, H, R, generator=g)
    q_pe = torch.randn(B, H, P, generator=g)
    lens = torch.tensor(lengths, dtype=torch.int64)
    scale = 2.0 * (R + P) ** -0.5  # a fairly peaked softmax
    return q_lat, q_pe, cache, bt, lens, scale


def _poisoned(cache, bt, lengths, bs):
    """The cache with every row no valid position reads set to NaN: masking must keep them out."""
    keep = torch.zeros(cache.shape[0], dtype=torch.bool)
    for b, L in enumerate(lengths.tolist()):
        t = torch.arange(L)
        keep[bt[b, t // bs] * bs + t % bs] = True
    out = cache.clone()
    out[~keep] = float("nan")
    return out


CASES = [
    # B, H, R, P, block_size, lengths, num_splits
    (1, 4, 32, 16, 16, [37], 1),
    (1, 4, 32, 16, 16, [200], 4),
    (3, 5, 32, 16, 16, [1, 37, 128], 1),
    (3, 5, 32, 16, 16, [1, 37, 128], 3),
    (4, 6, 64, 0, 16, [17, 1, 64, 150], 1),
    (4, 6, 64, 0, 64, [17, 1, 64, 150], 2),
    (2, 8, 64, 16, 64, [200, 65], None),
    (2, 7, 32, 8, 8, [93, 1], 5),
    (2, 4, 32, 16, 128, [129, 3], 2),
    (2, 20, 512, 64, 16, [70, 5], 1),
    (2, 20, 512, 64, 16, [70, 5], 2),
    (2, 4, 32, 16, 16, [200, 3], 40),  # mostly empty splits: the merge must skip them
]


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize(("B", "H", "R", "P", "bs", "lengths", "splits"), CASES)
def test_matches_reference_fp32(B, H, R, P, bs, lengths, splits):
    q_lat, q_pe, cache, bt, lens, scale = _case(B, H, R, P, bs, lengths, seed=B * 100 + H + P)
    ref = mp.paged_mla_decode_ref(q_lat, q_pe, cache, bt, lens, bs, scale)
    assert torch.isfinite(ref).all()
    out = mp.paged_mla_decode(
        q_lat, q_pe, _poisoned(cache, bt, lens, bs), bt, lens, bs, scale, num_splits=splits
    )
    assert out.shape == (B, H, R) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("splits", [1, 3])
def test_launch_overrides(splits):
    q_lat, q_pe, cache, bt, lens, scale = _case(3, 5, 64, 16, 64, [150, 1, 64])
    ref = mp.paged_mla_decode_ref(q_lat, q_pe, cache, bt, lens, 64, scale)
    out = mp.paged_mla_decode(
        q_lat, q_pe, cache, bt, lens, 64, scale, num_splits=splits, block_n=16, num_warps=2
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("interpreter")
def test_length_one_is_the_single_value():
    q_lat, q_pe, cache, bt, lens, scale = _case(2, 5, 32, 16, 16, [1, 1])
    out = mp.paged_mla_decode(q_lat, q_pe, cache, bt, lens, 16, scale, num_splits=2)
    c0 = cache[bt[:, 0] * 16, :32]  # position 0 of each row
    torch.testing.assert_close(out, c0[:, None, :].expand(2, 5, 32), atol=1e-6, rtol=0)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("splits", [1, 3])
def test_length_zero_gives_zeros(splits):
    q_lat, q_pe, cache, bt, lens, scale = _case(2, 4, 32, 16, 16, [0, 40])
    ref = mp.paged_mla_decode_ref(q_lat, q_pe, cache, bt, lens, 16, scale)
    out = mp.paged_mla_decode(q_lat, q_pe, cache, bt, lens, 16, scale, num_splits=splits)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("splits", [1, 3])
def test_bf16_and_out_dtype(splits):
    q_lat, q_pe, cache, bt, lens, scale = _case(
        3, 6, 64, 16, 16, [150, 1, 47], dtype=torch.bfloat16
    )
    q_lat, q_pe = q_lat.bfloat16(), q_pe.bfloat16()
    ref = mp.paged_mla_decode_ref(q_lat, q_pe, cache, bt, lens, 16, scale)
    out = mp.paged_mla_decode(q_lat, q_pe, cache, bt, lens, 16, scale, num_splits=splits)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    exact = mp.paged_mla_decode_ref(q_lat.float(), q_pe.float(), cache.float(), bt, lens, 16, scale)
    torch.testing.assert_close(out, exact, atol=5e-2, rtol=5e-2)
    o16 = mp.paged_mla_decode(
        q_lat, q_pe, cache, bt, lens, 16, scale, num_splits=splits, out_dtype=torch.bfloat16
    )
    assert o16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.float(), out, atol=1e-2, rtol=1e-2)


@pytest.mark.usefixtures("interpreter")
def test_lengths_past_the_table_are_clamped():
    q_lat, q_pe, cache, bt, lens, scale = _case(2, 4, 32, 16, 16, [40, 9])
    bt = torch.randperm(cache.shape[0] // 16)[: bt.numel()].view_as(bt)  # every column valid
    full = torch.full_like(lens, bt.shape[1] * 16)
    ref = mp.paged_mla_decode_ref(q_lat, q_pe, cache, bt, full, 16, scale)
    for splits in (1, 2):
        out = mp.paged_mla_decode(q_lat, q_pe, cache, bt, full + 1000, 16, scale, num_splits=splits)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _absorbed_vs_kernel(attn: MLAAttention, B, lengths, bs, splits, seed):
    g = torch.Generator().manual_seed(seed)
    H, R, P = attn.nh, attn.rank, attn.rope
    NB = _cdiv(max(lengths), bs)
    pool = B * NB + 2
    bt = torch.randperm(pool, generator=g)[: B * NB].view(B, NB)
    cache = torch.randn(pool * bs, R + P, generator=g)
    q_nope = torch.randn(B, H, attn.nope, generator=g)
    q_pe = torch.randn(B, H, P, generator=g)
    lens = torch.tensor(lengths)
    rows = (bt[:, :, None] * bs + torch.arange(bs)).view(B, -1)
    with torch.no_grad():
        expect = attn.attend_absorbed(q_nope, q_pe, cache[rows], lens)
        w_uk, w_uv = attn._absorb_weights()
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)
        o_lat = mp.paged_mla_decode(q_lat, q_pe, cache, bt, lens, bs, attn.scale, num_splits=splits)
        got = torch.einsum("bhr,hvr->bhv", o_lat, w_uv).reshape(B, -1)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("splits", [1, 2, None])
def test_matches_attend_absorbed_tiny_model(tiny_model, splits):
    li = tiny_model.config.full_attn_layers[0]
    attn = tiny_model.model.layers[li].self_attn
    assert isinstance(attn, MLAAttention)
    _absorbed_vs_kernel(attn, 3, [1, 45, 130], 16, splits, seed=1)


@pytest.mark.usefixtures("interpreter")
def test_matches_attend_absorbed_no_rope():
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=1,
        full_attn_layers=(0,),
        num_attention_heads=6,
        kv_lora_rank=64,
        qk_nope_head_dim=16,
        qk_rope_head_dim=0,
        v_head_dim=16,
    )
    torch.manual_seed(0)
    attn = MLAAttention(cfg)
    _absorbed_vs_kernel(attn, 2, [64, 33], 64, 2, seed=2)


def test_split_heuristic():
    f = mp.mla_decode_num_splits
    assert f(128, 16, 1024, 132) == 1  # 2 x 128 programs would not fit one per SM
    assert f(100, 16, 1024, 132) == 1
    assert f(64, 16, 1024, 132) == 2
    assert f(32, 16, 1024, 132) == 4
    assert f(1, 16, 1024, 132) == 8  # bounded by 128-token pieces of the context
    assert f(1, 16, 1 << 20, 132) == mp.MAX_SPLITS
    assert f(512, 16, 1024, 132) == 1
    assert f(4, 16, 16, 132) == 1  # short contexts never split
    assert f(8, 128, 4096, 132) == 2  # 8 head groups of 16 at R = 512
    assert f(1, 4, 200, 8, rank=32) == 2


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from prfaas.model import mla_paged as mp\n"
        "assert not mp.triton_available()\n"
        "x = torch.zeros(1, 1, 4)\n"
        "try:\n"
        "    mp.paged_mla_decode(x, x[..., :0], torch.zeros(4, 4), torch.zeros(1, 1, dtype=torch.long),"
        " torch.ones(1, dtype=torch.long), 4, 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


_COMPILE_SM90 = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prfaas.model import mla_paged as mp

sig = {"Q": "*bf16", "QPE": "*bf16", "Cache": "*bf16", "BT": "*i32", "Lens": "*i32"}
sig.update({"Out": "*fp32", "Lse": "*fp32"})
for s in ["qb", "qh", "pb", "ph", "cr", "btb", "ob", "os", "oh", "lb", "ls"]:
    sig["stride_" + s] = "i32"
sig.update({"H": "i32", "NB": "i32", "qk_scale": "fp32"})
block_n, warps, stages = mp._config(512, torch.bfloat16)
const = dict(R=512, P=64, BLOCK_R=512, BLOCK_P=64, BLOCK_H=16, BLOCK_N=block_n, PAGE=16)
const["NUM_SPLITS"] = 1
sig.update(dict.fromkeys(const, "constexpr"))
names = list(sig)
aligned = [n for n in names if sig[n] not in ("constexpr", "fp32") and n != "stride_lb"]
src = ASTSource(
    mp._mla_decode_kernel,
    sig,
    constexprs={(names.index(k),): v for k, v in const.items()},
    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
)
opts = dict(num_warps=warps, num_stages=stages)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
tile = "2x%dx512xbf16" % block_n
print(json.dumps({"shared": k.metadata.shared, "double_buffered": tile in k.asm["ttgir"]}))
"""


def test_hopper_config_compiles_and_fits():
    """The bf16 R=512/P=64 launch config compiles for sm_90 (no GPU needed: ptxas ships with
    triton), leaves room for two programs per H100 SM, and double-buffers the latent tile. In a
    subprocess: this process imported triton with the interpreter on."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton's nvidia backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["shared"] <= 227 * 1024 // 2 - 1024, res  # two programs per SM
    assert res["double_buffered"], "the latent tile is no longer double-buffered: retune stages"


@pytest.mark.usefixtures("interpreter")
def test_kernels_compile_for_sm90(monkeypatch):
    """Both kernels, with and without split-K, compile for an H100 (see test_triton_compile.py)."""
    from test_triton_compile import check_compiles

    def run():
        q_lat, q_pe, cache, bt, lens, scale = _case(
            2, 4, 64, 16, 16, [40, 17], dtype=torch.bfloat16
        )
        for splits in (1, 2):
            mp.paged_mla_decode(
                q_lat.bfloat16(), q_pe.bfloat16(), cache, bt, lens, 16, scale, num_splits=splits
            )

    check_compiles(monkeypatch, mp, run, min_kernels=2)
