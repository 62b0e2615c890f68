"""Save and load checkpoints in the HF Kimi Linear layout: ``config.json`` + safetensors files
(single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from prfaas.model.config import ModelConfig, resolve_config
from prfaas.model.materialize import empty_model, random_model
from prfaas.model.model import HybridForCausalLM
from prfaas.model.tp.group import TPGroup
from prfaas.model.tp.shard import shard_tensor
from prfaas.tokenizer.loader import BYTE_TOKENIZER_CLASS

# parameters kept in float32 whatever the load dtype (name suffixes): the router's gate weight and
# score-correction bias (transformers' _keep_in_fp32_modules_strict: bf16 would flip near-tied
# expert choices) and KDA's decay parameters A_log and dt_bias; the model reads them as float32
FP32_PARAMS = (".gate.weight", ".e_score_correction_bias", ".A_log", ".dt_bias")


def keeps_fp32(name: str) -> bool:
    return name.endswith(FP32_PARAMS)


def cast_model(model: HybridForCausalLM, dtype: torch.dtype) -> HybridForCausalLM:
    """``model.to(dtype)`` except that the ``FP32_PARAMS`` stay (or become) float32."""
    model.to(dtype)
    for name, p in model.named_parameters():
        if keeps_fp32(name):
            p.data = p.data.float()
    return model


def save_checkpoint(model: HybridForCausalLM, directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    # clones: the stacked experts' parameters are views of one tensor, which safetensors refuses
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    tok = d / "tokenizer_config.json"
    if not tok.exists():  # a preset's weights: say that its tokenizer is prfaas's byte tokenizer
        tok.write_text(json.dumps({"tokenizer_class": BYTE_TOKENIZER_CLASS}))
    return d


def _checkpoint_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d}")
    return files


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tp: TPGroup | None = None,
) -> HybridForCausalLM:
    """Build the model from ``config.json`` and load every tensor; missing or unexpected names and
    shape mismatches are errors. With ``tp`` (tensor parallel): the rank's model, each tensor read
    whole and sliced (:mod:`prfaas.model.tp.shard`).

    Streams: the parameters are allocated empty on ``device`` first (experts stacked, see
    :mod:`prfaas.model.materialize`), then each shard is opened in turn and each tensor read,
    moved to ``device`` and copied into its parameter (converted to ``dtype`` there) before the
    next is read (plain reads, no memory map). Host memory holds one tensor, never the model
    (unless ``device`` is the CPU, where the model itself lives)."""
    d = Path(directory)
    cfg = ModelConfig.from_json(d)
    files = _checkpoint_files(d)
    where: dict[str, Path] = {}
    ck_dtype: dict[str, torch.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:  # headers only
        for k, (dt, shape, _, _) in _header(f).items():
            where[k], shapes[k], ck_dtype[k] = f, shape, dt
    if cfg.tie_word_embeddings and "lm_head.weight" not in where:
        src = "model.embed_tokens.weight"
        if src in where:
            where["lm_head.weight"], shapes["lm_head.weight"] = where[src], shapes[src]
            ck_dtype["lm_head.weight"] = ck_dtype[src]
    with torch.device("meta"):
        expected = HybridForCausalLM(cfg).state_dict()
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {d} does not match its config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, t in expected.items():
        if shapes[k] != tuple(t.shape):
            raise ValueError(f"{k}: checkpoint shape {shapes[k]} != {tuple(t.shape)}")

    def dtype_of(name: str, p: torch.Tensor) -> torch.dtype:
        src = ck_dtype[name]
        if dtype is None or not src.is_floating_point:
            return src
        return torch.float32 if keeps_fp32(name) else dtype

    model = empty_model(cfg, device, dtype_of, tp)
    params = dict(model.named_parameters(remove_duplicate=False))
    rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
    with torch.no_grad():
        for f in files:
            for k, t in _read_tensors(f):
                got = shard_tensor(cfg, k, t, rank, size)
                if got is not None:
                    params[got[0]].copy_(got[1].to(params[got[0]].device))
    return model.eval()


def _header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """A safetensors file's tensors: name -> (dtype, shape, start, end), offsets from the start of
    the data section (which follows the 8-byte header length and the JSON header)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(n))
    out = {}
    for k, v in meta.items():
        if k == "__metadata__":
            continue
        if v["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: {k} has unsupported dtype {v['dtype']}")
        start, end = v["data_offsets"]
        out[k] = (_DTYPES[v["dtype"]], tuple(v["shape"]), start, end)
    return out


def _read_tensors(path: Path):
    """Yield (name, host tensor) one at a time, in file order, with plain reads (no memory map:
    the host holds one tensor's bytes at a time)."""
    entries = sorted(_header(path).items(), key=lambda kv: kv[1][2])
    with open(path, "rb") as fh:
        base = 8 + int.from_bytes(fh.read(8), "little")
        for k, (dt, shape, start, end) in entries:
            fh.seek(base + start)
            buf = bytearray(fh.read(end - start))
            if len(buf) != end - start:
                raise ValueError(f"{path}: {k} is truncated")
            t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
            yield k, t.view(shape)
            del t, buf


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def build_model(
    model: str | ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tp: TPGroup | None = None,
) -> HybridForCausalLM:
    """A checkpoint directory (config.json + safetensors) or a preset with random weights. On a
    GPU the random weights are drawn there (no host copy: see :mod:`prfaas.model.materialize`);
    on the CPU they are the CPU generator's draws from ``seed``, as ever. With ``tp``: the model
    of that tensor-parallel rank (random presets: its slices of the same whole model)."""
    if isinstance(model, str) and Path(model).is_dir() and list(Path(model).glob("*.safetensors")):
        return load_checkpoint(model, device=device, dtype=dtype, tp=tp)
    cfg = resolve_config(model)
    if torch.device(device).type != "cpu":
        return random_model(
            cfg, device, lambda n, p: torch.float32 if keeps_fp32(n) else dtype, seed, tp
        )
    m = HybridForCausalLM(cfg, tp).init_weights(seed)
    return cast_model(m.to(device=device), dtype).eval()
