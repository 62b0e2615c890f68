"""Rank 0 of a tensor-parallel instance: the engine's own process. It spawns ranks 1..size-1
(:mod:`prfaas.engine.tp_worker`), holds rank 0's slice of the model, and gives the engine

* :class:`ShardedHybridCache`: the engine's ``HybridCache`` (all bookkeeping: blocks, slots, prefix
  cache) over rank 0's cache tensors; the state operations it does on them (slot resets,
  checkpoint saves) are queued for the other ranks and sent with the next command; reading a
  request's KDA state (export) gathers every rank's heads, writing one (import) broadcasts it and
  each rank keeps its heads; MLA latent rows (replicated) are broadcast whole;
* :class:`TPModelRunner`: ``ModelRunner.step`` that first sends the step's inputs to the ranks;
* :meth:`TPRuntime.plan_memory`: the memory plan run on every rank, the smallest cache kept.

Exports are whole: the same ``KVExport`` as a TP=1 instance's (a KDA state is every rank's heads in
rank order), so a TP=a prefill instance hands off to a TP=b decode instance for any a and b; the
header's ``meta["tensor_parallel_size"]`` says how many ranks' shards it was gathered from.

Failures: a worker that raises reports on its pipe and exits; rank 0 checks that its ranks are
alive before each command and raises ``RuntimeError`` (the engine is then unusable); a collective
with a dead peer fails after ``PRFAAS_TP_TIMEOUT_S`` seconds (default 600).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from prfaas.cache.hybrid import CacheConfig, HybridCache, SeqCache
from prfaas.engine.memory_plan import MemoryPlan, plan_memory
from prfaas.engine.model_runner import ModelRunner
from prfaas.engine.tp_worker import RankSpec, build_rank_model, stream_gather, worker_main
from prfaas.model.batch import CacheTensors, SeqInput
from prfaas.model.config import ModelConfig, resolve_config
from prfaas.model.tp.group import DEFAULT_TIMEOUT_S, TPGroup, host_store
from prfaas.model.tp.shard import (
    check_tp,
    kda_conv_join,
    kda_conv_shard,
    kda_state_join,
    kda_state_shard,
    kv_geometry,
)


def timeout_s() -> float:
    return float(os.environ.get("PRFAAS_TP_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def check_devices(device: torch.device, size: int) -> str | None:
    """Why ``size`` ranks cannot start from ``device`` (one line), or None."""
    if device.type != "cuda" or size == 1:
        return None
    first = device.index or 0
    n = torch.cuda.device_count()
    if first + size > n:
        return (
            f"tensor_parallel_size {size} from cuda:{first} needs {first + size} GPUs; {n} visible"
        )
    return None


class TPRuntime:
    """Spawns and drives the worker ranks; ``model`` is rank 0's slice."""

    def __init__(
        self, model: str, size: int, device: torch.device, dtype: torch.dtype, seed: int
    ) -> None:
        cfg = resolve_config(model)
        why = check_tp(cfg, size) or check_devices(device, size)
        if why:
            raise ValueError(why)
        self.size = size
        self.spec = RankSpec(
            model=model,
            seed=seed,
            dtype=str(dtype).removeprefix("torch."),
            device_type=device.type,
            first_device=device.index or 0 if device.type == "cuda" else 0,
            timeout_s=timeout_s(),
        )
        self._ops: list[tuple] = []
        self._closed = False
        self.cache_ref: ShardedHybridCache | None = None
        store = host_store(self.spec.timeout_s)
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(1, size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main,
                args=(r, size, store.port, self.spec, child),
                name=f"prfaas-tp-rank{r}",
                daemon=True,
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        try:
            dev = self.spec.device(0)
            self.group = TPGroup.create(store, 0, size, dev, self.spec.timeout_s)
            self.model = build_rank_model(self.spec, self.group)
            for r in range(1, size):
                self._reply(r, "ready")
        except BaseException:
            self.close()
            raise
        self._store = store  # the workers' group was built on it: keep it alive

    # ----- commands ------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("the tensor-parallel instance is closed")
        for r, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                msg = self._error_of(r) or f"exit code {p.exitcode}"
                raise RuntimeError(f"tensor-parallel rank {r} died: {msg}")

    def _error_of(self, r: int) -> str | None:
        conn = self.conns[r - 1]
        try:
            while conn.poll(0):
                kind, val = conn.recv()
                if kind == "error":
                    return val
        except (EOFError, OSError):
            return None
        return None

    def _reply(self, r: int, kind: str) -> object:
        """Wait for rank r's ``kind`` reply (an ``error`` reply raises)."""
        conn, p, deadline = self.conns[r - 1], self.procs[r - 1], time.monotonic() + timeout_s()
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                got, val = conn.recv()
                if got == "error":
                    raise RuntimeError(val)
                if got == kind:
                    return val
            elif not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {r} exited ({p.exitcode})")
        raise TimeoutError(f"tensor-parallel rank {r}: no {kind!r} within {timeout_s()} s")

    def send(self, name: str, *args: object, ops: bool = True) -> None:
        """Command ``name`` to every worker, with the queued cache operations (``ops``)."""
        self._check_alive()
        payload = (name, self._take_ops(), *args) if ops else (name, *args)
        for conn in self.conns:
            conn.send(payload)

    def queue_op(self, op: tuple) -> None:
        self._ops.append(op)

    def _take_ops(self) -> list[tuple]:
        ops, self._ops = self._ops, []
        return ops

    # ----- engine parts --------------------------------------------------------------------------
    def plan_memory(self, base: CacheConfig, utilization: float, tokens: int) -> MemoryPlan:
        """Every rank's memory plan; the cache every rank can hold (the smallest)."""
        self.send("plan", base, utilization, tokens, ops=False)
        plan = plan_memory(self.model, base, utilization, tokens)
        cc = plan.cache_config
        for r in range(1, self.size):
            other = self._reply(r, "plan")
            cc = CacheConfig(
                block_size=cc.block_size,
                num_blocks=min(cc.num_blocks, other.num_blocks),
                max_seqs=cc.max_seqs,
                checkpoint_interval=cc.checkpoint_interval,
                num_checkpoints=min(cc.num_checkpoints, other.num_checkpoints),
                enable_prefix_cache=cc.enable_prefix_cache,
            )
        return dataclasses.replace(plan, cache_config=cc)

    def make_cache(self, cfg: CacheConfig, dtype: torch.dtype) -> ShardedHybridCache:
        self.send("cache", cfg, ops=False)
        self.cache_ref = ShardedHybridCache(self, self.model.config, cfg, self.group.device, dtype)
        return self.cache_ref

    def runner(self) -> TPModelRunner:
        return TPModelRunner(self)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()


class ShardedHybridCache(HybridCache):
    """The engine's cache of a tensor-parallel instance (rank 0): module docstring."""

    def __init__(
        self,
        runtime: TPRuntime,
        model: ModelConfig,
        cfg: CacheConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(kv_geometry(model, runtime.size), cfg, device, dtype)
        self.model = model  # the whole model: layer kinds, layout and exports are whole
        self.rt = runtime
        # KDA states gathered during a streaming step, (kda layer, slot) -> (state, conv)
        self.stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def attach_tier(self, tier: object) -> None:
        raise ValueError(
            "a second cache tier (prefix pool) is not supported with tensor_parallel_size > 1"
        )

    def _load_slot(self, slot: int, checkpoint: int | None) -> None:
        super()._load_slot(slot, checkpoint)
        self.rt.queue_op(("load_slot", slot, checkpoint))

    def _save_checkpoint(self, slot: int, checkpoint: int) -> None:
        super()._save_checkpoint(slot, checkpoint)
        self.rt.queue_op(("save_ckpt", slot, checkpoint))

    def gather_slot(self, j: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's heads of KDA layer j's state in ``slot`` (a collective)."""
        t, g = self.tensors, self.rt.group
        states = g.all_gather(t.kda_state[j][slot])
        convs = g.all_gather(t.conv_state[j][slot])
        return kda_state_join(states), kda_conv_join(convs)

    def read_kda_slot(self, j: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.stash.pop((j, slot), None)
        if got is not None:
            return got
        self.rt.send("read_kda", j, slot)
        return self.gather_slot(j, slot)

    def write_kda_slot(self, j: int, slot: int, state: torch.Tensor, conv: torch.Tensor) -> None:
        dev = self.tensors.kda_state[j].device
        st = state.to(dev, self.tensors.kda_state[j].dtype).contiguous()
        cv = conv.to(dev, self.tensors.conv_state[j].dtype).contiguous()
        self.rt.send(
            "write_kda",
            j,
            slot,
            (tuple(st.shape), tuple(cv.shape)),
            (str(st.dtype).removeprefix("torch."), str(cv.dtype).removeprefix("torch.")),
        )
        g = self.rt.group
        g.broadcast(st)
        g.broadcast(cv)
        super().write_kda_slot(
            j, slot, kda_state_shard(st, g.rank, g.size), kda_conv_shard(cv, g.rank, g.size)
        )

    def mla_rows_written(
        self, j: int, seq: SeqCache, token_start: int, token_end: int, kv: torch.Tensor
    ) -> None:
        """Rank 0 wrote them: the other ranks' replicas get the same rows (a broadcast)."""
        flat = self.tensors.mla_kv[j]
        kv = kv.to(flat.device, flat.dtype).contiguous()
        dt = str(kv.dtype).removeprefix("torch.")
        rows = self.rows(seq, token_start, token_end).cpu()
        self.rt.send("write_mla", j, rows, tuple(kv.shape), dt)
        self.rt.group.broadcast(kv)


class TPModelRunner(ModelRunner):
    """``ModelRunner`` of rank 0: every step's inputs go to the ranks first (with the queued cache
    operations), then every rank runs the same step on its slice. No CUDA graphs (the collectives
    are not captured), no pipelined decode."""

    def __init__(self, runtime: TPRuntime) -> None:
        super().__init__(runtime.model, cuda_graphs=False)
        self.rt = runtime
        self.kda_index = {li: j for j, li in enumerate(runtime.model.config.kda_layers)}

    def step(
        self,
        seqs: list[SeqInput],
        cache: CacheTensors,
        layer_callback: Callable[[int], None] | None = None,
        device_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if device_tokens is not None:
            raise ValueError("a tensor-parallel engine does not pipeline decode steps")
        # streaming: the state slots whose KDA layers every rank gathers after each layer (the
        # callback's ``slots``, the requests it exports; every row's when it does not say)
        stream = None
        if layer_callback is not None:
            stream = list(getattr(layer_callback, "slots", [x.slot for x in seqs]))
        plain = [SeqInput(s.token_ids.cpu(), s.start, list(s.block_table), s.slot) for s in seqs]
        self.rt.send("step", plain, stream)
        cb = None
        if stream is not None:
            sharded = self.rt.cache_ref

            def cb(li: int) -> None:
                j = self.kda_index.get(li)
                if j is not None:
                    for slot, (st, cv) in zip(
                        stream, stream_gather(self.rt.group, sharded, stream, j), strict=True
                    ):
                        sharded.stash[(j, slot)] = (kda_state_join(st), kda_conv_join(cv))
                layer_callback(li)
                sharded.stash.clear()

        return super().step(seqs, cache, cb)
