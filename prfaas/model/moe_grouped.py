"""The MoE's grouped path, for many rows: the (token, expert) pairs grouped by expert, then one
grouped GEMM for gate|up and one for down.

Pair p is token p // k, choice p % k (P = T * k pairs); ``w13`` (E, 2I, H) the stacked
[gate | up], ``w2`` (E, H, I) (nn.Linear layout). Two forms of the grouping:

* :func:`permute`: a stable sort by expert and the cumulative group ends, for
  :func:`grouped_mm` (``torch._grouped_mm`` on Hopper in bf16, no host sync; elsewhere
  :func:`grouped_mm_reference`, a loop that reads the group ends on the host);
* :func:`align_blocks`: each expert's pairs padded to whole row blocks on the device, for
  :func:`fused_experts` (a Triton grouped GEMM that gathers its rows inside the kernel).

Which form runs is :func:`prfaas.model.moe_ops.experts_forward`'s choice. Tile sizes were tuned
on an H200 (benchmarks/gpu_tune_moe.py, benchmarks/results/moe_tune_h200.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prfaas.model import moe_kernels, triton_ops

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def grouped_mm_reference(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows ``offs[e-1]:offs[e]`` of a (M, K) times ``w[e]^T`` (w: (E, N, K), nn.Linear layout),
    a loop over the groups (reads ``offs`` on the host). Returns (M, N) in a's dtype."""
    out = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    ends = offs.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = a[start:end] @ w[e].T.to(a.dtype)
        start = end
    return out


def capturable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the MoE of a model in ``dtype`` on ``device`` runs without host syncs (so its
    decode can be captured in a CUDA graph): bf16 on a Hopper GPU, where the grouped GEMMs are
    ``torch._grouped_mm`` (elsewhere they are loops that read the group ends on the host)."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_grouped_mm")
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def grouped_mm(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """:func:`grouped_mm_reference`'s function; on a Hopper GPU in bf16, ``torch._grouped_mm``
    (no host sync: the group ends stay on the device)."""
    if a.dtype == w.dtype and capturable(a.dtype, a.device):
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    return grouped_mm_reference(a, w, offs)


def permute(idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Expert ids (T, k) -> (order (T*k,): the flat pair indices sorted by expert, stable;
    offs (E,) int32: cumulative group ends). Pair p is token p // k, choice p % k."""
    flat = idx.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=idx.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
    return order, offs


def unpermute(order: Tensor) -> Tensor:
    """:func:`permute`'s ``order`` (T*k,) -> its inverse: ``inv[p]`` is the row of pair p in the
    expert-sorted order (``inv[order[i]] = i``), for :func:`prfaas.model.moe_ops.combine`."""
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return inv


# fused_experts' tiles by pair count: (pairs at most, {BM, BN, BK, num_warps, num_stages})
FUSED_CONFIGS = [
    (2048, {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3}),
    (16384, {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4}),
    (1 << 62, {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}),
]


# align_blocks by two Triton kernels up to this many pairs (the counting sort's last program
# scans all pairs before it: at 8192 pairs slower than torch's sort; the Triton grouped path per
# layer on an H200: 256 pairs 0.525 vs 0.574 ms, 1024 pairs 0.876 vs 0.908 ms with the kernels)
ALIGN_KERNEL_MAX_PAIRS = 2048


def align_blocks(idx: Tensor, num_experts: int, bm: int) -> tuple[Tensor, Tensor]:
    """Expert ids (T, k) -> (pairs (NB*bm,): the flat pair indices grouped by expert, each group
    padded to a multiple of ``bm`` with the value T*k; block_expert (NB,): the expert of each
    block of ``bm`` rows, -1 past the last). NB = ceil(T*k / bm) + E bounds the blocks from the
    shapes alone (no host sync). On CUDA up to ``ALIGN_KERNEL_MAX_PAIRS`` pairs: two Triton
    kernels (counts, padded starts and block owners in one program; a stable counting sort);
    elsewhere torch ops (a stable sort, searchsorted, a scatter)."""
    flat = idx.reshape(-1)
    P, dev = flat.numel(), flat.device
    nb = -(-P // bm) + num_experts
    if triton_ops.enabled(flat) and P <= ALIGN_KERNEL_MAX_PAIRS:  # two kernels instead of ~15
        pairs = torch.empty(nb * bm, dtype=torch.int64, device=dev)
        be = torch.empty(nb, dtype=torch.int32, device=dev)
        pstart = torch.empty(num_experts, dtype=torch.int32, device=dev)
        if P:
            ids = flat.contiguous()
            moe_kernels.align_counts_kernel[(1,)](
                ids, pstart, be, pairs, P, nb, E=num_experts,
                BE=triton.next_power_of_2(num_experts), BM=bm, BP=64, BF=1024,
            )  # fmt: skip
            moe_kernels.align_place_kernel[(triton.cdiv(P, 64),)](ids, pstart, pairs, P, BP=64)
        else:
            pairs.fill_(0)
            be.fill_(-1)
        return pairs, be
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=dev, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, bounds, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + bm - 1) // bm * bm
    pend = torch.cumsum(padded, 0)
    shift = (pend - padded) - (ends - counts)  # padded start - start, per expert
    pos = torch.arange(P, device=dev) + shift[sorted_ids]
    pairs = torch.full((nb * bm,), P, dtype=torch.int64, device=dev)
    pairs.scatter_(0, pos, order)
    be = torch.searchsorted(pend, torch.arange(nb, device=dev, dtype=pend.dtype) * bm, right=True)
    return pairs, torch.where(be < num_experts, be, -1)


def fused_experts(
    x: Tensor, weights: Tensor, idx: Tensor, w13: Tensor, w2: Tensor, config: dict | None = None
) -> Tensor:
    """The routed experts' weighted outputs in pair order, (T*k, H), by two Triton grouped GEMMs
    over :func:`align_blocks`' blocks: gate|up with the rows of x gathered in the kernel and
    ``silu(gate) * up * weight`` in its epilogue, then down, each pair's row written in place."""
    T, k = idx.shape
    P, H, inter = T * k, x.shape[1], w2.shape[2]
    c = config or next(c for n, c in FUSED_CONFIGS if n >= P)
    pairs, be = align_blocks(idx, w13.shape[0], c["BM"])
    nb = be.shape[0]
    x = x.contiguous()
    scale = weights.reshape(-1).float().contiguous()
    a = torch.empty(P, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(P, H, dtype=x.dtype, device=x.device)
    opts = {key: c[key] for key in ("BM", "BN", "BK", "num_warps", "num_stages")}
    moe_kernels.fused_moe_kernel[(nb, triton.cdiv(inter, c["BN"]))](
        x, w13, a, scale, pairs, be, P, inter, H, DIV=k, GATE_UP=True, **opts
    )
    moe_kernels.fused_moe_kernel[(nb, triton.cdiv(H, c["BN"]))](
        a, w2, y, scale, pairs, be, P, H, inter, DIV=1, GATE_UP=False, **opts
    )
    return y
