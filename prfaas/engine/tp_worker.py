"""A worker rank (1 .. size-1) of a tensor-parallel instance: its own process, its slice of the
model and of the cache, driven by rank 0 (:mod:`prfaas.engine.tp_runtime`) over a pipe.

Commands (tuples, first item the name) arrive in the order rank 0 issues them; each carries the
cache operations rank 0 queued since the previous command (state slot resets from zeros or a
checkpoint, checkpoint saves), applied first. Data moves through the group's collectives, never
the pipe: a step's all-reduces happen inside the model; exports all-gather the KDA state shards to
rank 0; imports broadcast from rank 0. The worker replies on the pipe only to ``plan`` and when it
fails (then it exits: rank 0's next collective times out or sees the process gone).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from prfaas.cache.hybrid import HybridCache
from prfaas.engine.model_runner import ModelRunner
from prfaas.model.batch import SeqInput
from prfaas.model.checkpoint import build_model
from prfaas.model.model import HybridForCausalLM
from prfaas.model.tp.group import TPGroup, join_store
from prfaas.model.tp.shard import kda_conv_shard, kda_state_shard


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to build its part (picklable)."""

    model: str
    seed: int
    dtype: str  # a torch dtype's name: "float32", "bfloat16", ...
    device_type: str  # "cpu" or "cuda"
    first_device: int  # CUDA: rank r runs on device first_device + r
    timeout_s: float

    def device(self, rank: int) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", self.first_device + rank)
        return torch.device("cpu")

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def build_rank_model(spec: RankSpec, tp: TPGroup) -> HybridForCausalLM:
    return build_model(spec.model, tp.device, spec.torch_dtype(), spec.seed, tp)


def apply_ops(cache: HybridCache, ops: list[tuple]) -> None:
    """Rank 0's queued cache operations, in order."""
    for op in ops:
        if op[0] == "load_slot":
            HybridCache._load_slot(cache, op[1], op[2])
        elif op[0] == "save_ckpt":
            HybridCache._save_checkpoint(cache, op[1], op[2])
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown cache op {op[0]!r}")


def stream_gather(
    tp: TPGroup, cache: HybridCache, slots: list[int], j: int
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Every rank's shards of KDA layer ``j``'s states in ``slots`` (a collective: every rank
    calls it at the same layer with the same ``slots``)."""
    t = cache.tensors
    return [(tp.all_gather(t.kda_state[j][s]), tp.all_gather(t.conv_state[j][s])) for s in slots]


class Worker:
    def __init__(self, spec: RankSpec, tp: TPGroup, model: HybridForCausalLM) -> None:
        self.spec, self.tp, self.model = spec, tp, model
        self.runner = ModelRunner(model, cuda_graphs=False)
        self.cache: HybridCache | None = None
        self.kda_index = {li: j for j, li in enumerate(model.config.kda_layers)}

    def handle(self, cmd: tuple, conn: Connection) -> None:
        name, args = cmd[0], cmd[1:]
        if name == "cache":
            self.cache = HybridCache(
                self.model.kv_geometry, args[0], self.tp.device, self.spec.torch_dtype()
            )
            return
        if name == "plan":
            from prfaas.engine.memory_plan import plan_memory

            base, util, tokens = args
            conn.send(("plan", plan_memory(self.model, base, util, tokens).cache_config))
            return
        assert self.cache is not None
        apply_ops(self.cache, args[0])
        getattr(self, "_" + name)(*args[1:])

    @torch.inference_mode()
    def _step(self, seqs: list[SeqInput], stream: list[int] | None) -> None:
        """One step; ``stream``: the slots whose KDA states rank 0 gathers after each KDA layer
        (a layer-wise streaming step), None otherwise."""
        cb = None
        if stream is not None:

            def cb(li: int) -> None:
                if li in self.kda_index:
                    stream_gather(self.tp, self.cache, stream, self.kda_index[li])

        self.runner.step(seqs, self.cache.tensors, cb)

    def _read_kda(self, j: int, slot: int) -> None:
        t = self.cache.tensors
        self.tp.all_gather(t.kda_state[j][slot])
        self.tp.all_gather(t.conv_state[j][slot])

    @torch.inference_mode()
    def _write_mla(self, j: int, rows: torch.Tensor, shape: tuple, dtype: str) -> None:
        kv = torch.empty(shape, dtype=getattr(torch, dtype), device=self.tp.device)
        self.tp.broadcast(kv)
        HybridCache.write_mla_rows(self.cache, j, rows.to(self.tp.device), kv)

    @torch.inference_mode()
    def _write_kda(self, j: int, slot: int, shapes: tuple, dtypes: tuple) -> None:
        dev = self.tp.device
        state = self.tp.broadcast(
            torch.empty(shapes[0], dtype=getattr(torch, dtypes[0]), device=dev)
        )
        conv = self.tp.broadcast(
            torch.empty(shapes[1], dtype=getattr(torch, dtypes[1]), device=dev)
        )
        r, n = self.tp.rank, self.tp.size
        HybridCache.write_kda_slot(
            self.cache, j, slot, kda_state_shard(state, r, n), kda_conv_shard(conv, r, n)
        )


def worker_main(rank: int, size: int, port: int, spec: RankSpec, conn: Connection) -> None:
    """Entry point of worker rank ``rank`` (a spawned process): join the group, build the rank's
    model, say ``ready``, then run commands until ``stop`` or until rank 0's end of the pipe
    closes."""
    try:
        dev = spec.device(rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        tp = TPGroup.create(join_store(port, spec.timeout_s), rank, size, dev, spec.timeout_s)
        worker = Worker(spec, tp, build_rank_model(spec, tp))
        conn.send(("ready", None))
        while True:
            try:
                cmd: Any = conn.recv()
            except EOFError:
                return
            if cmd[0] == "stop":
                return
            worker.handle(cmd, conn)
    except BaseException:  # noqa: BLE001 - reported to rank 0, then this rank exits
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(("error", f"tensor-parallel rank {rank}: {traceback.format_exc()}"))
