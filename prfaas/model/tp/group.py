"""The process group of one tensor-parallel instance and the collectives its model uses.

The group is a standalone ``torch.distributed`` backend object (``ProcessGroupGloo`` on the CPU,
``ProcessGroupNCCL`` on CUDA) built on a ``TCPStore`` that rank 0 hosts on the loopback: no default
process group is created, so one process may hold several instances (the tests build TP=1 and TP=2
engines side by side). Every collective is blocking for the host on gloo; on NCCL it is ordered on
the current CUDA stream.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def backend_for(device: torch.device) -> str:
    """``nccl`` on CUDA, ``gloo`` elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def host_store(timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """Rank 0's store on 127.0.0.1 and a free port (``store.port``)."""
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout_s))


def join_store(port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore(
        "127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=timeout_s)
    )


@dataclass
class TPGroup:
    """Rank ``rank`` of ``size``; ``pg`` the backend object (None when size == 1)."""

    rank: int
    size: int
    pg: Any = None
    device: torch.device | None = None

    @classmethod
    def create(
        cls,
        store: dist.Store,
        rank: int,
        size: int,
        device: torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TPGroup:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore("prfaas-tp", store)
        if backend_for(device) == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, size, opts)
        else:  # on the loopback whatever this host's name resolves to
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            pg = dist.ProcessGroupGloo(store, rank, size, opts)
        return cls(rank, size, pg, device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place; returns ``t``."""
        if self.size > 1:
            self.pg.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype everywhere), in rank order."""
        if self.size == 1:
            return [t]
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([out], [t]).wait()
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` of rank ``src`` into ``t`` of every rank (in place); returns ``t``."""
        if self.size > 1:
            self.pg.broadcast(t, src).wait()
        return t
