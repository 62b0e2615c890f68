"""Pipelined greedy decode (``EngineConfig.async_decode``): a greedy decode-only step is launched
before the previous one's tokens are read back, its input tokens taken from the previous step's
tokens on the device, so the device never waits for the host between steps.

:func:`launch_greedy` launches one step and starts copying its tokens to the host;
:class:`PendingDecode` is that step until it is read back; :func:`carried_tokens` picks the
previous step's device tokens for the rows of the step scheduled ahead of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prfaas.engine.model_runner import ModelRunner
from prfaas.engine.schedule_types import SchedulerOutput
from prfaas.engine.step_io import model_inputs
from prfaas.model.batch import CacheTensors


@dataclass
class PendingDecode:
    """A greedy decode step launched and not yet read back."""

    sched: SchedulerOutput
    tokens: torch.Tensor  # (n,) int64 on the device: each row's greedy token
    host: torch.Tensor  # (n,) its host copy (pinned on CUDA), filled asynchronously
    event: torch.cuda.Event | None  # set once ``host`` holds the tokens (CUDA)

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def launch_greedy(
    runner: ModelRunner,
    cache_tensors: CacheTensors,
    sched: SchedulerOutput,
    device_tokens: torch.Tensor | None,
) -> PendingDecode:
    """Launch the greedy decode step ``sched`` on ``runner`` over the cache's tensors: its input
    tokens from the host, or (an ``ahead`` step) ``device_tokens``, the tokens of a step not yet
    read back. Returns without waiting for the device."""
    logits = runner.step(model_inputs(sched), cache_tensors, None, device_tokens=device_tokens)
    tokens = logits.argmax(-1)
    event = None
    if tokens.is_cuda:
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host = tokens
    return PendingDecode(sched, tokens, host, event)


def carried_tokens(prev: PendingDecode, ahead: SchedulerOutput) -> torch.Tensor:
    """``prev``'s device tokens as the inputs of ``ahead``'s rows (a subset of ``prev``'s, in
    order): all of them, or those of the rows that go on when some requests ended."""
    tokens = prev.tokens
    if len(ahead.rows) < len(prev.sched.rows):  # some rows end: gather the others' tokens
        index = {id(r.request): i for i, r in enumerate(prev.sched.rows)}
        pick = torch.tensor([index[id(r.request)] for r in ahead.rows])
        if tokens.is_cuda:  # from pinned memory: a pageable copy would wait for step prev
            pick = pick.pin_memory().to(tokens.device, non_blocking=True)
        tokens = tokens.index_select(0, pick)
    return tokens
