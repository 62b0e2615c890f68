"""The streaming checkpoint reader (``prfaas.model.checkpoint.read_shard_into``): every loaded
parameter is byte-equal to the tensor the checkpoint holds (converted as ``Tensor.to`` converts
where the load dtype differs), with reads split inside tensors and coalesced across them, the
staging buffers reused, on the CPU and (where there is one) a GPU; short files are errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from prfaas.model import checkpoint
from prfaas.model.checkpoint import keeps_fp32, load_checkpoint, read_shard_into
from prfaas.model.config import PRESETS
from prfaas.model.model import HybridForCausalLM

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _write(model: HybridForCausalLM, d, dtype: torch.dtype, shards: int = 3) -> dict:
    """A sharded checkpoint of ``model`` in ``dtype`` (fp32 parameters kept fp32, as released);
    returns the tensors written."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    sd = {
        k: v.detach().to(torch.float32 if keeps_fp32(k) else dtype).clone()
        for k, v in model.state_dict().items()
    }
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sd


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


@pytest.fixture(scope="module")
def tiny_model():
    return HybridForCausalLM(PRESETS["tiny"]).init_weights(3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("ck_dtype", "load_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),  # the release: raw copies
        (torch.float32, torch.bfloat16),  # converted on the device, fp32 params kept
        (torch.bfloat16, torch.float32),  # widened
        (torch.bfloat16, None),  # the checkpoint's dtypes
    ],
)
def test_loaded_bytes_equal_the_checkpoint(
    tmp_path, tiny_model, monkeypatch, device, ck_dtype, load_dtype
):
    # reads of 1002 bytes (not a multiple of 4): big tensors split, small ones coalesced, and a
    # read that mixes raw pieces with converted ones; 3 staging buffers reused many times
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1002)
    monkeypatch.setattr(checkpoint, "READ_DEPTH", 3)
    sd = _write(tiny_model, tmp_path / "ck", ck_dtype)
    m = load_checkpoint(tmp_path / "ck", device=device, dtype=load_dtype)
    got = m.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        want = v if load_dtype is None or keeps_fp32(k) else v.to(load_dtype)
        assert got[k].device.type == device
        assert _same_bytes(got[k], want), k
    assert m.model.layers[1].block_sparse_moe.is_packed()


@pytest.mark.parametrize("device", DEVICES)
def test_default_reads_equal_small_reads(tmp_path, tiny_model, monkeypatch, device):
    _write(tiny_model, tmp_path / "ck", torch.bfloat16, shards=1)
    a = load_checkpoint(tmp_path / "ck", device=device, dtype=torch.bfloat16).state_dict()
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    b = load_checkpoint(tmp_path / "ck", device=device, dtype=torch.bfloat16).state_dict()
    assert all(_same_bytes(a[k], b[k]) for k in a)


def test_non_contiguous_target_and_plain_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 64)
    x = torch.randn(7, 5)
    y = torch.arange(300, dtype=torch.int64)
    save_file({"x": x, "y": y, "z": torch.zeros(0)}, str(tmp_path / "f.safetensors"))
    tx = torch.empty(5, 7).t()  # (7, 5), not contiguous
    ty = torch.empty(300, dtype=torch.int64)
    read_shard_into(tmp_path / "f.safetensors", {"x": tx, "y": ty}, "cpu")
    assert torch.equal(tx, x) and torch.equal(ty, y)


def test_truncated_shard_is_an_error(tmp_path, tiny_model):
    _write(tiny_model, tmp_path / "ck", torch.bfloat16, shards=2)
    f = tmp_path / "ck" / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)


def test_reference_reader_agrees(tmp_path, tiny_model):
    # safetensors' own reader against ours, raw bf16 both ways
    sd = _write(tiny_model, tmp_path / "ck", torch.bfloat16, shards=1)
    ref = load_file(str(tmp_path / "ck" / "model-00001-of-00001.safetensors"))
    m = load_checkpoint(tmp_path / "ck").state_dict()
    assert all(_same_bytes(m[k], ref[k]) and _same_bytes(ref[k], sd[k]) for k in sd)


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_tensors_convert(tmp_path, device):
    # a bf16 tensor of 3 values puts the next (fp32) tensor 2 bytes off 4-byte alignment; both
    # read in one coalesced read and converted
    a = torch.randn(3).to(torch.bfloat16)
    b = torch.randn(5)
    head = {
        "a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]},
    }
    raw = json.dumps(head).encode()
    data = a.view(torch.uint8).numpy().tobytes() + b.view(torch.uint8).numpy().tobytes()
    f = tmp_path / "m.safetensors"
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    ta = torch.empty(3, device=device)  # widened
    tb = torch.empty(5, dtype=torch.bfloat16, device=device)  # narrowed
    read_shard_into(f, {"a": ta, "b": tb}, device)
    assert _same_bytes(ta, a.float()) and _same_bytes(tb, b.to(torch.bfloat16))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_staged_reads_reuse_buffers_in_order(tmp_path, tiny_model, monkeypatch, depth):
    # the GPU load's path on the CPU: every read through the rotating staging buffers (reads of
    # 4 KiB, many in flight), then copied out; a buffer reused too early would mix tensors
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(checkpoint, "READ_DEPTH", depth)
    sd = _write(tiny_model, tmp_path / "ck", torch.bfloat16, shards=1)
    f = tmp_path / "ck" / "model-00001-of-00001.safetensors"
    targets = {k: torch.empty_like(v) for k, v in sd.items()}
    read_shard_into(f, targets, "cpu", host_in_place=False)
    assert all(_same_bytes(targets[k], v) for k, v in sd.items())


def test_names_and_shapes_that_do_not_match_are_refused(tmp_path, tiny_model):
    sd = _write(tiny_model, tmp_path / "ck", torch.bfloat16, shards=1)
    f = tmp_path / "ck" / "model-00001-of-00001.safetensors"
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    save_file(missing, str(f))
    with pytest.raises(ValueError, match=r"does not match its config: missing \['model.norm"):
        load_checkpoint(tmp_path / "ck")
    save_file({**sd, "model.extra": torch.zeros(2)}, str(f))
    with pytest.raises(ValueError, match=r"unexpected \['model.extra'\]"):
        load_checkpoint(tmp_path / "ck")
    save_file({**sd, "model.norm.weight": torch.zeros(3)}, str(f))
    with pytest.raises(ValueError, match="model.norm.weight: checkpoint shape"):
        load_checkpoint(tmp_path / "ck")
