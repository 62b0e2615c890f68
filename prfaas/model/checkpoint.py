"""Save and load checkpoints in the HF Kimi Linear layout: ``config.json`` + safetensors files
(single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prfaas.model.config import ModelConfig, resolve_config
from prfaas.model.model import HybridForCausalLM
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
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> HybridForCausalLM:
    """Build the model from ``config.json`` and load every tensor; missing or unexpected names and
    shape mismatches are errors."""
    d = Path(directory)
    cfg = ModelConfig.from_json(d)
    with torch.device("meta"):
        model = HybridForCausalLM(cfg)
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(d):
        for k, v in load_file(str(f), device=str(device)).items():
            loaded[k] = v
    if cfg.tie_word_embeddings:
        loaded.setdefault("lm_head.weight", loaded.get("model.embed_tokens.weight"))
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {d} does not match its config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, t in expected.items():
        if tuple(loaded[k].shape) != tuple(t.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(loaded[k].shape)} != {tuple(t.shape)}")
    if dtype is not None:
        loaded = {
            k: (v.float() if keeps_fp32(k) else v.to(dtype)) if v.is_floating_point() else v
            for k, v in loaded.items()
        }
    model.load_state_dict(loaded, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def build_model(
    model: str | ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> HybridForCausalLM:
    """A checkpoint directory (config.json + safetensors) or a preset with random weights."""
    if isinstance(model, str) and Path(model).is_dir() and list(Path(model).glob("*.safetensors")):
        return load_checkpoint(model, device=device, dtype=dtype)
    cfg = resolve_config(model)
    m = HybridForCausalLM(cfg).init_weights(seed)
    return cast_model(m.to(device=device), dtype).eval()
