"""Save and load checkpoints in the HF Kimi Linear layout: ``config.json`` + safetensors files
(single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
    :mod:`prfaas.model.materialize`), then each shard is read in turn straight into them
    (:func:`read_shard_into`: plain reads, no memory map; on a GPU through a few reused pinned
    buffers, a dtype conversion done on the device). Host memory holds ``READ_DEPTH *
    CHUNK_BYTES`` (128 MiB) of staging, never the model nor one whole tensor (unless ``device``
    is the CPU, where the model itself lives). Tensor-parallel loads read each tensor whole
    (to slice it) and hold one at a time."""
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

    def dtype_of(name: str, p: torch.Tensor) -> torch.dtype:
        src = ck_dtype.get(name)
        if src is None:  # not in the checkpoint: refused below
            return dtype or p.dtype
        if dtype is None or not src.is_floating_point:
            return src
        return torch.float32 if keeps_fp32(name) else dtype

    rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
    model = None
    if size == 1:  # the allocated model's own names and shapes (one module tree built, not two)
        model = empty_model(cfg, device, dtype_of)
        expected = model.state_dict()
    else:  # the whole model's names, which the checkpoint holds
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
    if model is None:
        model = empty_model(cfg, device, dtype_of, tp)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        if size == 1:
            staging = _Staging(torch.device(device))
            for f in files:
                targets = {k: params[k] for k in _header(f) if k in params}
                read_shard_into(f, targets, device, staging)
        else:
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
    the host holds one tensor's bytes at a time). For tensor-parallel loads, which slice each
    tensor; whole-model loads use :func:`read_shard_into`."""
    entries = sorted(_header(path).items(), key=lambda kv: kv[1][2])
    with open(path, "rb") as fh:
        base = 8 + int.from_bytes(fh.read(8), "little")
        for k, (dt, shape, start, end) in entries:
            fh.seek(base + start)
            buf = bytearray(end - start)
            if fh.readinto(buf) != end - start:
                raise ValueError(f"{path}: {k} is truncated")
            t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
            yield k, t.view(shape)
            del t, buf


# ----- streaming a shard into allocated parameters --------------------------------------------
# bytes per read: one staging buffer's size (GPU loads). Smaller reads copy faster: on the 2-core
# Firecracker VM one thread reads tmpfs into a 64 MiB buffer at 2.9 GB/s, a 16 MiB one at 4.2
# GB/s, a 4 MiB one at 4.6 GB/s (the buffer stays in cache); the H200 loaded at 3.9 GB/s with
# 4 x 64 MiB (benchmarks/load_peak.py --read-configs compares settings there)
CHUNK_BYTES = 16 << 20
HOST_CHUNK_BYTES = 4 << 20  # the same for CPU loads (staging only for dtype conversions)
READ_DEPTH = 8  # reads in flight (threads) and staging buffers
_MAX_IOV = 512  # tensors per read (preadv takes at most IOV_MAX = 1024 buffers)


@dataclass
class _Piece:
    """A run of one tensor's bytes: ``nbytes`` at file offset ``start``, for ``dest`` (the flat
    parameter's bytes when ``src_dtype`` is None, else its elements, converted from
    ``src_dtype``)."""

    start: int
    nbytes: int
    dest: torch.Tensor
    src_dtype: torch.dtype | None


@dataclass
class _Read:
    """One read: ``nbytes`` contiguous bytes from file offset ``start``, the pieces at their
    offsets within it."""

    start: int
    nbytes: int
    pieces: list[tuple[int, _Piece]] = field(default_factory=list)


def _plan_reads(
    path: Path, targets: dict[str, torch.Tensor], chunk: int
) -> tuple[list[_Read], list[str]]:
    """The reads (each at most ``chunk`` bytes) that fill ``targets`` (name -> contiguous
    parameter) from ``path``, in file order, and the names of non-contiguous targets (read
    whole, see :func:`read_shard_into`)."""
    header = _header(path)
    with open(path, "rb") as fh:
        base = 8 + int.from_bytes(fh.read(8), "little")
    size = os.path.getsize(path)
    pieces: list[_Piece] = []
    whole: list[str] = []
    for name, (dt, _, start, end) in sorted(header.items(), key=lambda kv: kv[1][2]):
        p = targets.get(name)
        if p is None:
            continue
        n = end - start
        if n != p.numel() * dt.itemsize:
            raise ValueError(f"{path}: {name} holds {n} bytes, not {p.numel()} x {dt}")
        if base + end > size:
            raise ValueError(f"{path}: {name} is truncated (the file has {size} bytes)")
        if n == 0:
            continue
        if not p.is_contiguous():
            whole.append(name)
            continue
        flat = p.detach().view(-1)
        raw = dt == p.dtype
        dest = flat.view(torch.uint8) if raw else flat
        step = chunk - chunk % dt.itemsize
        for off in range(0, n, step):
            m = min(step, n - off)
            d = dest[off : off + m] if raw else dest[off // dt.itemsize : (off + m) // dt.itemsize]
            pieces.append(_Piece(base + start + off, m, d, None if raw else dt))
    reads: list[_Read] = []
    for pc in pieces:
        cur = reads[-1] if reads else None
        if (
            cur is not None
            and pc.start == cur.start + cur.nbytes
            and cur.nbytes + pc.nbytes <= chunk
            and len(cur.pieces) < _MAX_IOV
        ):
            cur.pieces.append((cur.nbytes, pc))
            cur.nbytes += pc.nbytes
        else:
            reads.append(_Read(pc.start, pc.nbytes, [(0, pc)]))
    return reads, whole


def _pread_full(fd: int, bufs: list[memoryview], offset: int, path: Path) -> None:
    """Fill ``bufs`` (in order) from ``fd`` at ``offset``; a short file is an error."""
    bufs = list(bufs)
    while bufs:
        n = os.preadv(fd, bufs, offset)
        if n <= 0:
            raise ValueError(f"{path}: truncated at byte {offset}")
        offset += n
        while bufs and n >= bufs[0].nbytes:
            n -= bufs[0].nbytes
            bufs.pop(0)
        if n:
            bufs[0] = bufs[0][n:]


class _Staging:
    """``READ_DEPTH`` host buffers of ``chunk`` bytes (``CHUNK_BYTES``, pinned, when the
    parameters are on a CUDA device; else ``HOST_CHUNK_BYTES`` at most), allocated on first use
    and reused by every shard of one load."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.chunk = CHUNK_BYTES if device.type != "cpu" else min(CHUNK_BYTES, HOST_CHUNK_BYTES)
        self.slots: list[torch.Tensor] = []
        self.views: list[memoryview] = []
        self.events: list[torch.cuda.Event | None] = [None] * READ_DEPTH
        self.convert: torch.Tensor | None = None  # device buffer for converting reads

    def slot(self, i: int) -> tuple[torch.Tensor, memoryview]:
        """Buffer ``i``, once the device copies out of its last contents are done."""
        if not self.slots:
            for _ in range(READ_DEPTH):
                t = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.cuda)
                self.slots.append(t)
                self.views.append(memoryview(t.numpy()))
        ev = self.events[i]
        if ev is not None:
            ev.synchronize()
            self.events[i] = None
        return self.slots[i], self.views[i]

    def converter(self, nbytes: int) -> torch.Tensor:
        if self.convert is None:
            self.convert = torch.empty(self.chunk, dtype=torch.uint8, device=self.device)
        return self.convert[:nbytes]


def read_shard_into(
    path: str | Path,
    targets: dict[str, torch.Tensor],
    device: str | torch.device,
    staging: _Staging | None = None,
    host_in_place: bool = True,
) -> None:
    """Copy the tensors of safetensors file ``path`` named in ``targets`` into those tensors
    (allocated, of the checkpoint's shapes, all on ``device``), converting the dtype where the
    target's differs. Plain reads (``preadv``, no memory map), ``READ_DEPTH`` in flight on
    threads, each of up to ``CHUNK_BYTES`` (consecutive tensors coalesced, larger ones split).

    On the CPU a read (of up to ``HOST_CHUNK_BYTES``) lands straight in the parameters' memory
    (staging only for a dtype conversion: ``READ_DEPTH * HOST_CHUNK_BYTES``, 32 MiB). On a GPU
    each read fills a reused pinned buffer and is copied to the device without blocking, while
    the next reads proceed; one synchronise at the end. Host memory: ``READ_DEPTH *
    CHUNK_BYTES`` (128 MiB) whatever the tensors' sizes. ``host_in_place=False`` sends CPU
    reads through the staging buffers too, as a GPU load's are (tests of that path)."""
    path = Path(path)
    dev = torch.device(device)
    st = staging or _Staging(dev)
    on_host = dev.type == "cpu"
    reads, whole = _plan_reads(path, targets, st.chunk)
    fd = os.open(path, os.O_RDONLY)
    pending: deque[tuple[_Read, int, bool, Future]] = deque()
    pool = ThreadPoolExecutor(READ_DEPTH, thread_name_prefix="ckpt-read")

    def finish(r: _Read, i: int, in_place: bool, fut: Future) -> None:
        fut.result()
        if in_place:
            return
        buf = st.slots[i]
        for off, pc in r.pieces:
            src = buf[off : off + pc.nbytes]
            if pc.src_dtype is None:
                pc.dest.copy_(src, non_blocking=True)
            elif on_host:  # (a misaligned run is copied out first: view() needs alignment)
                al = src if off % pc.src_dtype.itemsize == 0 else src.clone()
                pc.dest.copy_(al.view(pc.src_dtype))
            else:
                conv = st.converter(pc.nbytes)
                conv.copy_(src, non_blocking=True)
                pc.dest.copy_(conv.view(pc.src_dtype))
        if st.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            st.events[i] = ev

    try:
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for j, r in enumerate(reads):
            i = j % READ_DEPTH
            in_place = on_host and host_in_place and all(pc.src_dtype is None for _, pc in r.pieces)
            if in_place:
                bufs = [memoryview(pc.dest.numpy()) for _, pc in r.pieces]
            else:
                _, view = st.slot(i)
                bufs = [view[: r.nbytes]]
            fut = pool.submit(_pread_full, fd, bufs, r.start, path)
            pending.append((r, i, in_place, fut))
            if len(pending) == READ_DEPTH:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
        if st.cuda:
            torch.cuda.current_stream(dev).synchronize()
    finally:
        for *_, fut in pending:  # an error: no thread may still write into a buffer
            fut.cancel()
            with contextlib.suppress(Exception):
                fut.result()
        pool.shutdown(wait=True)
        os.close(fd)
    if whole:
        wanted = set(whole)
        for k, t in _read_tensors(path):
            if k in wanted:
                targets[k].copy_(t)


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
