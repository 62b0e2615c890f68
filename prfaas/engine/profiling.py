"""Measure a model on the current device as the planner needs it (the paper's Table 5): KV bytes
S_kv and prefill latency at several input lengths, decode step time against batch size."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prfaas.engine.engine import EngineConfig, LLMEngine
from prfaas.engine.sampling import SamplingParams
from prfaas.kv.unit import KVExport, LayerPart
from prfaas.model.checkpoint import build_model
from prfaas.model.model import HybridForCausalLM
from prfaas.scheduling.profile import HandoffTiming, HardwareProfile, handoff_costs


@dataclass
class ProfileResult:
    """Measured points; ``profile()`` turns them into a HardwareProfile."""

    name: str
    model: str
    device: str
    lengths: list[int] = field(default_factory=list)
    kv_bytes: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # length -> why
    decode_ctx: int = 0
    decode_batch: list[int] = field(default_factory=list)
    decode_step_s: list[float] = field(default_factory=list)
    handoff: list[HandoffTiming] = field(default_factory=list)

    def profile(self, gpus_per_instance: int = 1) -> HardwareProfile:
        costs = handoff_costs(self.handoff) if len(self.handoff) >= 2 else {}
        return HardwareProfile(
            name=self.name,
            gpus_per_instance=gpus_per_instance,
            lengths=tuple(self.lengths),
            kv_bytes=tuple(self.kv_bytes),
            prefill_s=tuple(self.prefill_s),
            decode_batch=tuple(self.decode_batch),
            decode_step_s=tuple(self.decode_step_s),
            **costs,
        )


def kv_bytes(model: HybridForCausalLM, length: int, dtype_bytes: int) -> int:
    """Bytes a prefill of ``length`` tokens leaves in the cache: MLA latents of every token plus the
    fixed KDA recurrent (fp32) and short-conv states."""
    cfg = model.config
    return cfg.mla_bytes_per_token(dtype_bytes) * length + cfg.kda_state_bytes(dtype_bytes)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def time_prefill(
    model: HybridForCausalLM,
    length: int,
    reps: int = 2,
    chunk: int | None = None,
    checkpoint_interval: int = 0,
) -> float:
    """Best of ``reps`` (after one warm-up) seconds to prefill ``length`` tokens on a fresh cache;
    ``checkpoint_interval`` > 0: with the prefix cache on, KDA states checkpointed every that many
    tokens, as a node with prefix caching prefills (slower: the prefill stops at each one)."""
    budget = chunk or length
    ck = {}
    if checkpoint_interval > 0:
        ck = dict(
            checkpoint_interval=checkpoint_interval,
            num_checkpoints=length // checkpoint_interval + 4,
        )
    eng = LLMEngine(
        EngineConfig(
            model=model.config.name,
            max_num_batched_tokens=budget,
            max_model_len=length + 8,
            max_num_seqs=2,
            enable_prefix_cache=checkpoint_interval > 0,
            **ck,
            num_blocks=-(-(length + 8) // 16) + 4,
            device=str(model.lm_head.weight.device),
            dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
        ),
        model=model,
    )
    best = float("inf")
    for r in range(reps + 1):
        prompt = [(7 * i + r) % 250 for i in range(length)]
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        _sync(eng.device)
        t0 = time.perf_counter()
        while (st := eng.stats()).prefilling or st.waiting:
            eng.step()
        _sync(eng.device)
        if r:
            best = min(best, time.perf_counter() - t0)
        while eng.has_unfinished():
            eng.step()
    return best


def time_decode(
    model: HybridForCausalLM, batch: int, ctx: int, steps: int, cuda_graphs: bool = True
) -> float:
    """Mean seconds per decode step of ``batch`` sequences at context ``ctx``."""
    eng = LLMEngine(
        EngineConfig(
            model=model.config.name,
            max_num_batched_tokens=max(min(batch * ctx, 16384), ctx),
            max_num_seqs=batch,
            max_model_len=ctx + steps + 8 + batch * ctx // 1024,
            enable_prefix_cache=False,
            num_blocks=batch * (-(-(ctx + steps + 8 + batch * ctx // 1024) // 16)) + 8,
            device=str(model.lm_head.weight.device),
            dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
            cuda_graphs=cuda_graphs,
        ),
        model=model,
    )
    # sequences prefilled in early steps decode while later ones prefill: enough tokens that all
    # ``batch`` sequences are still running through the timed steps
    prefill_steps = -(-batch * ctx // eng.config.max_num_batched_tokens) + 1
    for b in range(batch):
        eng.add_request(
            [(b + 3 * i) % 250 for i in range(ctx)],
            SamplingParams(temperature=0, max_tokens=steps + 3 + prefill_steps, ignore_eos=True),
        )
    while (st := eng.stats()).prefilling or st.waiting:
        eng.step()
    for _ in range(2):
        eng.step()  # warm-up (graph capture)
    _sync(eng.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    _sync(eng.device)
    running = eng.stats().running
    if running != batch:
        raise RuntimeError(f"decode timing ran with {running} sequences, not {batch}")
    return (time.perf_counter() - t0) / steps


def _host_copy(exp: KVExport) -> KVExport:
    parts = [
        LayerPart(p.layer, p.kind, {k: t.to("cpu") for k, t in p.tensors.items()})
        for p in exp.parts
    ]
    return KVExport(exp.header, parts)


def time_handoff(model: HybridForCausalLM, length: int, reps: int = 2) -> HandoffTiming:
    """Export a ``length``-token prefill from a prefill-role engine (to host memory, as the node's
    sender takes it) and import it into a decode-role engine, as the nodes do; best of ``reps``
    after one warm-up."""
    dev = model.lm_head.weight.device
    common = dict(
        model=model.config.name,
        max_num_batched_tokens=length,
        max_model_len=length + 8,
        max_num_seqs=2,
        enable_prefix_cache=False,
        num_blocks=2 * (-(-(length + 8) // 16)) + 4,
        device=str(dev),
        dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
    )
    pre = LLMEngine(EngineConfig(role="prefill", **common), model=model)
    dec = LLMEngine(EngineConfig(role="decode", **common), model=model)
    best = [float("inf")] * 3
    nbytes = 0
    for r in range(reps + 1):
        prompt = [(5 * i + r) % 250 for i in range(length)]
        rid = pre.add_request(prompt, SamplingParams(temperature=0, max_tokens=1), kv_start=0)
        while pre.has_unfinished() and rid not in pre.scheduler.prefilled:
            pre.step()
        _sync(dev)
        t0 = time.perf_counter()
        exp = _host_copy(pre.export_request(rid))
        _sync(dev)
        t1 = time.perf_counter()
        pre.release(rid)
        nbytes = exp.nbytes()
        dec.import_request(exp, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        _sync(dev)
        t2 = time.perf_counter()
        while not any(o.token_ids for o in dec.step()):
            pass
        _sync(dev)
        t3 = time.perf_counter()
        while dec.has_unfinished():
            dec.step()
        if r:
            best = [min(b, x) for b, x in zip(best, (t1 - t0, t2 - t1, t3 - t2), strict=True)]
    return HandoffTiming(length, nbytes, *best)


def run_profile(
    model: str | HybridForCausalLM,
    lengths: Sequence[int],
    batches: Sequence[int],
    ctx: int,
    steps: int = 10,
    device: str = "auto",
    name: str | None = None,
    chunk: int | None = None,
    log: Callable[[str], None] | None = None,
    handoff: bool = True,
    checkpoint_interval: int = 0,
) -> ProfileResult:
    """Measure prefill at each length (lengths that run out of memory are skipped), decode at
    each batch size and (``handoff``) the hand-off's export / import at the shortest and the
    longest length that fit. Raises ValueError on bad arguments."""
    lengths, batches = sorted(set(lengths)), sorted(set(batches))
    if len(lengths) < 2 or lengths[0] < 2:
        raise ValueError(f"need at least 2 distinct prefill lengths >= 2, got {list(lengths)}")
    if not batches or batches[0] < 1:
        raise ValueError(f"decode batch sizes must be >= 1, got {list(batches)}")
    if ctx < 2 or steps < 1:
        raise ValueError(f"decode context must be >= 2 and steps >= 1 (got {ctx}, {steps})")
    say = log or (lambda s: None)
    if isinstance(model, str):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"bad device {device!r}") from e
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model = build_model(model, dev, dtype)
    dev = model.lm_head.weight.device
    dtype_bytes = model.lm_head.weight.element_size()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res = ProfileResult(
        name=name or f"{model.config.name}-{dev_name.replace(' ', '_')}",
        model=model.config.name,
        device=dev_name,
        decode_ctx=ctx,
    )
    with torch.inference_mode():
        for n in lengths:
            try:
                t = time_prefill(model, n, chunk=chunk, checkpoint_interval=checkpoint_interval)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if not _is_oom(e):
                    raise
                res.skipped[n] = "out of memory"
                say(f"prefill {n}: skipped (out of memory)")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            res.lengths.append(n)
            res.kv_bytes.append(float(kv_bytes(model, n, dtype_bytes)))
            res.prefill_s.append(t)
            say(f"prefill {n}: {t * 1e3:.2f} ms, S_kv {res.kv_bytes[-1] / 2**20:.2f} MiB")
        for b in batches:
            t = time_decode(model, b, ctx, steps)
            res.decode_batch.append(b)
            res.decode_step_s.append(t)
            say(f"decode batch {b} ctx {ctx}: {t * 1e3:.2f} ms/step")
        if handoff and len(res.lengths) >= 2:
            for n in (res.lengths[0], res.lengths[-1]):
                h = time_handoff(model, n)
                res.handoff.append(h)
                say(
                    f"hand-off {n}: {h.nbytes} B, export {h.export_s * 1e3:.2f} ms, import "
                    f"{h.import_s * 1e3:.2f} ms, first step {h.first_step_s * 1e3:.2f} ms"
                )
    if len(res.lengths) < 2:
        raise ValueError(f"fewer than 2 prefill lengths fit on {dev_name}: {res.skipped}")
    return res
