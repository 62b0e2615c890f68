"""A synthetic checkpoint in the Kimi Linear release format: the model's tensors under the
release's names and dtypes (bf16; the parameters prfaas keeps fp32 stored fp32), its shards,
the release's config.json fields, safetensors headers written by hand (so that shards stream
from the GPU without a host copy of the model), and a digest of each tensor's bytes that the CPU
and a GPU compute alike."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path


def model_config(name: str, layers: int | None):
    """The preset's ModelConfig, cut to its first ``layers`` layers if given (a fallback where the
    whole geometry does not fit; the report says so)."""
    from prfaas.model.config import resolve_config

    cfg = resolve_config(name)
    if layers and layers < cfg.num_hidden_layers:
        full = tuple(i for i in cfg.full_attn_layers if i < layers)
        moe = any(cfg.is_moe_layer(i) for i in range(layers))
        cfg = dataclasses.replace(
            cfg,
            num_hidden_layers=layers,
            full_attn_layers=full,
            num_experts=cfg.num_experts if moe else 0,  # as config.json reads back
            name=f"{cfg.name}-{layers}l",
        )
    return cfg


def release_config(cfg) -> dict:
    """config.json with the fields of the released Kimi-Linear-48B-A3B config (their spelling:
    ``model_max_length``, ``first_k_dense_replace`` + ``moe_layer_freq``, the auto_map, ...),
    for ``cfg``'s geometry; prfaas reads it back to ``cfg``."""
    from prfaas.model.config import ModelConfig

    d = cfg.to_hf_dict()
    for k in ("mlp_layer_types", "max_position_embeddings", "rope_theta"):
        d.pop(k, None)
    d.update(
        {
            "auto_map": {
                "AutoConfig": "configuration_kimi.KimiLinearConfig",
                "AutoModel": "modeling_kimi.KimiLinearModel",
                "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
            },
            "head_dim": 72,
            "initializer_range": 0.02,
            "model_max_length": cfg.max_position_embeddings,
            "moe_layer_freq": 1,
            "num_key_value_heads": cfg.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "pad_token_id": cfg.vocab_size - 1,
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
    )
    back = ModelConfig.from_hf_dict(d)
    if back.fingerprint() != cfg.fingerprint():
        raise AssertionError("release config.json does not read back to the model's geometry")
    return dict(sorted(d.items()))


def tensor_specs(cfg) -> list[dict]:
    """The checkpoint's tensors in release order: name, shape, safetensors dtype, bytes."""
    import torch

    from prfaas.model.checkpoint import keeps_fp32
    from prfaas.model.model import HybridForCausalLM

    with torch.device("meta"):
        sd = HybridForCausalLM(cfg).state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out = []
    for k, v in sd.items():
        dt, size = ("F32", 4) if keeps_fp32(k) else ("BF16", 2)
        out.append({"name": k, "shape": list(v.shape), "dtype": dt, "nbytes": v.numel() * size})
    return out


def plan_shards(specs: list[dict], shard_bytes: int) -> list[dict]:
    """Consecutive tensors in shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[dict] = []
    for s in specs:
        if not shards or (
            shards[-1]["nbytes"] + s["nbytes"] > shard_bytes and shards[-1]["tensors"]
        ):
            shards.append({"tensors": [], "nbytes": 0})
        shards[-1]["tensors"].append(s["name"])
        shards[-1]["nbytes"] += s["nbytes"]
    n = len(shards)
    for i, sh in enumerate(shards):
        sh["file"] = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def safetensors_header(entries: list[dict]) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header (padded to 8 bytes) of a file holding ``entries`` in
    order, and each entry's data offset."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for e in entries:
        meta[e["name"]] = {
            "dtype": e["dtype"],
            "shape": e["shape"],
            "data_offsets": [pos, pos + e["nbytes"]],
        }
        offsets.append(pos)
        pos += e["nbytes"]
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def write_all(fd: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    while mv.nbytes:
        n = os.write(fd, mv)
        mv = mv[n:]


class _Done:
    """A CPU copy's stand-in for a CUDA event: already complete."""

    def synchronize(self) -> None:
        pass


def write_staged(fd: int, srcs: list, slots: list, stream=None, on_chunk=None) -> int:
    """Write the bytes of ``srcs`` (flat uint8 tensors, on any device) to ``fd`` in order through
    two host buffers ``slots`` of equal size: the copies into one run while the other is
    written; small tensors share a buffer, large ones span several. With a CUDA ``stream`` the
    copies run there without blocking (an event per buffer); else they are plain copies.
    ``on_chunk(n)`` is called after each full buffer is queued. Returns the bytes written."""
    import torch

    chunk = slots[0].numel()
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    cur, off, written = 0, 0, 0
    pending = None  # (buffer, bytes, event): queued, not yet written

    def flush(cur: int, n: int, pending):
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
        else:
            ev = _Done()
        if pending is not None:  # the other buffer: written while this one's copies run
            pending[2].synchronize()
            write_all(fd, slots[pending[0]][: pending[1]].numpy())
        return (cur, n, ev)

    with ctx:
        for src in srcs:
            pos, n = 0, src.numel()
            while pos < n:
                take = min(n - pos, chunk - off)
                slots[cur][off : off + take].copy_(src[pos : pos + take], non_blocking=True)
                off, pos = off + take, pos + take
                if off == chunk:
                    pending = flush(cur, off, pending)
                    written += chunk
                    cur, off = cur ^ 1, 0
                    if on_chunk is not None:
                        on_chunk(chunk)
        if off:
            pending = flush(cur, off, pending)
            written += off
        if pending is not None:
            pending[2].synchronize()
            write_all(fd, slots[pending[0]][: pending[1]].numpy())
    return written


def digests(tensors: dict, names: list[str]) -> dict[str, list[int]]:
    """Per tensor, two int64 sums over its bytes read as int32 (or uint8): plain, and each
    value times (its index mod 8191) + 1. Integer sums wrap identically in any order, so the
    CPU and a GPU agree; any changed byte changes the pair (a swap changes the second)."""
    import torch

    out, CH = {}, 1 << 24
    ws: dict = {}
    for k in names:
        t = tensors[k].detach().contiguous().reshape(-1).view(torch.uint8)
        x = t
        if t.numel() % 4 == 0:
            with contextlib.suppress(RuntimeError):  # a misaligned view stays bytes
                x = t.view(torch.int32)
        acc = torch.zeros(2, dtype=torch.int64, device=t.device)
        w = ws.get(t.device)
        if w is None:
            w = ws[t.device] = torch.arange(CH, device=t.device, dtype=torch.int64)
        for i in range(0, x.numel(), CH):
            c = x[i : i + CH].to(torch.int64)
            acc[0] += c.sum()
            acc[1] += (c * ((w[: c.numel()] + i) % 8191 + 1)).sum()
        out[k] = acc
    return {k: [int(a) for a in v.tolist()] for k, v in out.items()}


def corrupt(ck_dir: Path, name: str) -> None:
    """Flip the first byte of tensor ``name`` in its shard, or (``truncate:NAME``) cut its shard
    off inside that tensor (tests: the check must catch the one, the loader refuse the other)."""
    cut = name.startswith("truncate:")
    name = name.removeprefix("truncate:")
    index = json.loads((ck_dir / "model.safetensors.index.json").read_text())
    f = (ck_dir / index["weight_map"][name]).resolve()
    with open(f, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(n))
        pos = 8 + n + meta[name]["data_offsets"][0]
        if cut:
            fh.truncate(pos + 1)
            return
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x40]))
