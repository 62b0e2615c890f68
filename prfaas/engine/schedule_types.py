"""What a schedule is made of: the scheduler's configuration (``SchedulerConfig``) and one
``schedule()``'s answer (``SchedulerOutput``: the rows to run, ``ScheduledRow``, and the KV imports
to write first, ``ScheduledImport``).  Plain data: the engine runs it, ``Scheduler`` makes it."""

from __future__ import annotations

from dataclasses import dataclass, field

from prfaas.engine.request import KVArrival, Request


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # token budget of one step
    max_model_len: int = 4096  # prompt + output tokens of one request
    stop_ids: frozenset[int] = frozenset()  # end a request unless it sets ignore_eos


@dataclass(frozen=True)
class ScheduledRow:
    """One request's share of a step: compute tokens [start, start + num_tokens)."""

    request: Request
    start: int
    num_tokens: int
    is_prefill: bool  # prompt tokens (or an imported request's first token), not a decode
    hands_off: bool  # prefill role: the chunk that completes the prefill (then no sample)
    samples: bool  # the row's last position yields the request's next token

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class ScheduledImport:
    """A KV import to write into ``request``'s (allocated) cache before the step runs, or, with
    ``error``, one dropped (``request.kv_arrival.on_done`` still to be called)."""

    request: Request
    arrival: KVArrival
    error: str | None = None


@dataclass
class SchedulerOutput:
    rows: list[ScheduledRow] = field(default_factory=list)  # decodes first, then prefills
    imports: list[ScheduledImport] = field(default_factory=list)  # before the rows run
    preempted: list[str] = field(default_factory=list)  # request ids, in this schedule
    # request ids ended outside a step since the last update (aborts, timeouts, no room left)
    finished: list[str] = field(default_factory=list)
    # pipelined decode: each row is one position past what the host knows; its input token is
    # the previous step's output, still on the device
    ahead: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def prefills(self) -> list[ScheduledRow]:
        return [r for r in self.rows if r.is_prefill]

    @property
    def decodes(self) -> list[ScheduledRow]:
        return [r for r in self.rows if not r.is_prefill]
