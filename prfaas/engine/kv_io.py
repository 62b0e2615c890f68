"""Export a request's cache from a HybridCache and import one into it (the prefill → decode hand-off).

What is exported: the MLA latent KV of tokens [token_start, token_end) and the KDA recurrent + short-conv
state after token_end tokens, where token_end = prompt length - 1: as in vLLM's disaggregated serving the
decode node computes the last prompt token itself, so it samples the first output token and the prefill
node can stream every layer's part while the prefill is still running. Imports are validated completely before the cache is touched.

Layer by layer (``validate_header`` + ``validate_layer`` + ``write_layer``): the decode node writes
each layer into the request's blocks as it lands, while later layers are still on the wire; the
final import then checks and writes only the layers not written yet. Each layer is copied once,
from the receive buffer into the cache (on a GPU node: the host-to-device copy), run by run of
consecutive blocks straight into them (``row_runs``; scattered blocks: one ``index_copy_``).
"""

from __future__ import annotations

from collections.abc import Set

import torch

from prfaas.cache.hashing import hash_chain
from prfaas.cache.hybrid import HybridCache, SeqCache
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader
from prfaas.model.config import ModelConfig


class ImportMismatch(ValueError):
    """An imported cache does not fit this node's model or cache."""


def export_layer(
    cache: HybridCache, seq: SeqCache, layer: int, token_start: int, token_end: int
) -> LayerPart:
    """The part of model layer ``layer``, copied out of the cache on the cache's device (the
    cache may be released and reused right after). On a GPU the copies stay there: the sender stages
    them through pinned host memory asynchronously, so the engine thread never waits on a
    device-to-host copy."""
    model = cache.model
    kind = model.layer_kind(layer)
    if kind == "mla":
        j = model.mla_layers.index(layer)
        flat = cache.tensors.mla_kv[j].view(-1, model.latent_dim)
        kv = flat[cache.rows(seq, token_start, token_end)]  # a gather: a copy
        return LayerPart(layer, "mla", {"kv": kv})
    state, conv = cache.read_kda_slot(model.kda_layers.index(layer), seq.slot)
    return LayerPart(layer, "kda", {"state": state, "conv": conv})


def transfer_header(
    model: ModelConfig,
    request_id: str,
    prompt: list[int],
    token_start: int,
    block_size: int,
    meta: dict,
) -> TransferHeader:
    """The header of the KV of ``prompt``'s tokens [token_start, len(prompt) - 1) under ``model``:
    its fingerprint and layers, the prompt and its prefix hashes by ``block_size`` blocks."""
    return TransferHeader(
        request_id=request_id,
        model_fingerprint=model.fingerprint(),
        num_layers=model.num_hidden_layers,
        layer_kinds=model.layer_kinds,
        token_start=token_start,
        token_end=len(prompt) - 1,
        prompt_token_ids=list(prompt),
        prefix_hashes=hash_chain(prompt, block_size),
        meta=meta,
    )


def export_kv(cache: HybridCache, seq: SeqCache, header: TransferHeader) -> KVExport:
    """The part of each of ``header.num_layers`` layers (:func:`export_layer`) of ``seq``'s
    tokens [header.token_start, header.token_end), with ``header``."""
    parts = [
        export_layer(cache, seq, i, header.token_start, header.token_end)
        for i in range(header.num_layers)
    ]
    return KVExport(header, parts)


def expected_shapes(model: ModelConfig, layer: int, num_tokens: int) -> dict[str, tuple[int, ...]]:
    if model.layer_kind(layer) == "mla":
        return {"kv": (num_tokens, model.latent_dim)}
    H, D, W = model.kda_num_heads, model.kda_head_dim, model.kda_width
    return {"state": (H, D, D), "conv": (3, W, model.short_conv_kernel_size - 1)}


def validate_header(model: ModelConfig, h: TransferHeader) -> None:
    """The header's model, layers and token range against this node's model (ImportMismatch)."""
    if h.model_fingerprint != model.fingerprint():
        raise ImportMismatch(
            f"model fingerprint {h.model_fingerprint} != this node's {model.fingerprint()}"
        )
    if h.num_layers != model.num_hidden_layers or list(h.layer_kinds) != model.layer_kinds:
        raise ImportMismatch("layer count or kinds differ from this node's model")
    if not 0 <= h.token_start <= h.token_end or h.token_end != len(h.prompt_token_ids) - 1:
        raise ImportMismatch(
            f"bad token range [{h.token_start}, {h.token_end}) for a "
            f"{len(h.prompt_token_ids)}-token prompt (expected [start, prompt length - 1))"
        )


def validate_layer(model: ModelConfig, h: TransferHeader, p: LayerPart) -> None:
    """One layer's part of a request with (validated) header ``h``: kind, shapes, finite floats."""
    if not 0 <= p.layer < model.num_hidden_layers:
        raise ImportMismatch(f"layer {p.layer} out of range")
    want = expected_shapes(model, p.layer, h.token_end - h.token_start)
    got = {k: tuple(t.shape) for k, t in p.tensors.items()}
    if p.kind != model.layer_kind(p.layer) or got != want:
        raise ImportMismatch(f"layer {p.layer}: got {p.kind} {got}, expected {want}")
    for k, t in p.tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ImportMismatch(f"layer {p.layer} tensor {k!r} is not finite floating point")


def validate_export(model: ModelConfig, exp: KVExport, skip: Set[int] = frozenset()) -> None:
    """The whole export; the parts of layers in ``skip`` (validated as they landed) are only
    checked to be there."""
    validate_header(model, exp.header)
    if [p.layer for p in exp.parts] != list(range(model.num_hidden_layers)):
        raise ImportMismatch("export must hold exactly one part per layer, in order")
    for p in exp.parts:
        if p.layer not in skip:
            validate_layer(model, exp.header, p)


def write_layer(
    cache: HybridCache, seq: SeqCache, token_start: int, token_end: int, p: LayerPart
) -> None:
    """Write one validated layer part into a request's blocks (MLA rows of tokens
    [token_start, token_end)) or state slot (KDA): one copy, straight into the destination."""
    model = cache.model
    if p.kind == "mla":
        j = model.mla_layers.index(p.layer)
        flat = cache.tensors.mla_kv[j].view(-1, model.latent_dim)
        kv = p.tensors["kv"]
        runs = row_runs(seq.blocks, cache.cfg.block_size, token_start, token_end)
        if len(runs) <= MAX_RUNS:  # each run of consecutive blocks: one copy, straight in
            for dst, src, n in runs:
                flat[dst : dst + n].copy_(kv[src : src + n])
        else:  # scattered blocks: one gather-scatter (on a GPU, through a device temporary)
            rows = cache.rows(seq, token_start, token_end)
            flat.index_copy_(0, rows.to(flat.device), kv.to(flat.device, flat.dtype))
        cache.mla_rows_written(j, seq, token_start, token_end, kv)  # tensor parallel: to the ranks
    else:
        j = model.kda_layers.index(p.layer)
        cache.write_kda_slot(j, seq.slot, p.tensors["state"], p.tensors["conv"])


MAX_RUNS = 64  # more runs of consecutive blocks than this: one index_copy_ instead


def row_runs(
    blocks: list[int], block_size: int, token_start: int, token_end: int
) -> list[tuple[int, int, int]]:
    """Tokens [token_start, token_end) of a sequence whose cache blocks are ``blocks``, as runs
    of consecutive flat cache rows: ``(first row, first token - token_start, length)``."""
    runs: list[tuple[int, int, int]] = []
    pos = token_start
    while pos < token_end:
        b, off = divmod(pos, block_size)
        n = min(block_size - off, token_end - pos)
        row = blocks[b] * block_size + off
        if runs and runs[-1][0] + runs[-1][2] == row:
            d, s0, m = runs[-1]
            runs[-1] = (d, s0, m + n)
        else:
            runs.append((row, pos - token_start, n))
        pos += n
    return runs


def write_import(
    cache: HybridCache, seq: SeqCache, exp: KVExport, skip: Set[int] = frozenset()
) -> None:
    """Write a validated export into a request's blocks and state slot; the layers in ``skip``
    are there already (written as they landed)."""
    h = exp.header
    for p in exp.parts:
        if p.layer not in skip:
            write_layer(cache, seq, h.token_start, h.token_end, p)
