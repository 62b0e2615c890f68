"""The control-plane messages between the gateway and the nodes (JSON over HTTP), as pydantic models.

Both sides build and parse these models, never hand-checked dicts: a message with an unknown key,
a wrong type (strict: no ``"1"`` for an int, no ``true`` for a number) or a value out of range is
refused with ``ValueError`` (pydantic's ``ValidationError``), which a node answers with HTTP 400
``bad_request``.

Routes (node side, see ``prfaas.server.node.routes``):

=================================  =====================  ======================================
route                              body                   answer
=================================  =====================  ======================================
``POST /internal/prefill``         :class:`PrefillRequest` :class:`PrefillResult`
``POST /internal/decode``          :class:`DecodeRequest`  NDJSON stream of :data:`DecodeEvent`
``POST /internal/abort/{rid}``     --                      :class:`AbortResult`
``GET  /state``                    --                      :class:`NodeState`
``GET  /health``                   --                      :class:`NodeHealth`
``POST /admin/link``               :class:`LinkAdmin`      :class:`LinkAdminResult`
``GET  /internal/cache_events``    ``?since=N``            :class:`CacheEventsReply`
``POST /internal/prefix_publish``  :class:`PrefixRequest`  :class:`PrefixPublishResult`
``POST /internal/prefix_copy``     :class:`PrefixCopy`     :class:`PrefixCopyResult`
``POST /internal/prompt_logprobs`` :class:`PromptScore`    :class:`PromptScoreResult`
=================================  =====================  ======================================

Errors: HTTP 4xx/5xx with :class:`ErrorBody` (``{"error": {"code", "message"}}``); codes
``bad_request``, ``wrong_role``, ``overloaded`` (400/503), ``transfer_failed``, ``copy_failed``.

Units: token counts and ids are integers; sizes in bytes; ``*_s`` durations in seconds;
``*_at`` and ``timings`` values are ``time.time()`` stamps of the host that wrote them; link rates in
Gbit/s.  This module imports neither torch nor the engine (the gateway uses it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class Message(BaseModel):
    """Base of every message: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


# ---- sampling ---------------------------------------------------------------------------------
class SamplingParamsMsg(Message):
    """The engine's ``SamplingParams`` on the wire (same fields and defaults; a test keeps them
    equal); the node turns it into the engine's dataclass, which checks the values again."""

    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)  # -1 (or 0) = no top-k
    max_tokens: int = Field(16, ge=1)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    min_tokens: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    logprobs: int | None = Field(None, ge=0, le=20)  # the sampled token's and the top k


# ---- prefill ------------------------------------------------------------------------------------
class DecodeTarget(Message):
    """Where a prefill node sends the KV: the decode node's cluster and KV receiver address."""

    cluster: str
    kv_host: str
    kv_port: int = Field(ge=0, le=65535)


class PrefillRequest(Message):
    """Prefill ``prompt_token_ids`` and ship its KV from ``token_start`` (the prefix the decode
    node already holds) to ``decode``; give up after ``timeout_s``."""

    request_id: str = Field(min_length=1)
    prompt_token_ids: list[int]
    params: SamplingParamsMsg = Field(default_factory=SamplingParamsMsg)
    token_start: int = Field(0, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    decode: DecodeTarget


class PrefillResult(Message):
    """A prefill done and its KV acknowledged by the decode node's receiver."""

    request_id: str
    node: str
    cluster: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens this node took from its prefix cache
    token_start: int  # the KV sent starts here
    payload_bytes: int  # KV bytes sent (tensors only)
    wire_bytes: int  # bytes on the wire (framing, headers)
    prefill_s: float
    transfer_s: float  # sender open to receiver ack
    link: str | None  # "src->dst" when the KV crossed clusters
    timings: dict[str, float | None]  # where the time went on this node (time.time() stamps)


# ---- decode -------------------------------------------------------------------------------------
class DecodeRequest(Message):
    """Open the decode of a request: the node answers with a stream of :data:`DecodeEvent`."""

    request_id: str = Field(min_length=1)
    prompt_token_ids: list[int] = Field(min_length=1)
    params: SamplingParamsMsg = Field(default_factory=SamplingParamsMsg)
    # seconds the node waits for the KV (None: as long as the router keeps the stream open);
    # then the request ends with an error event, so a KV that never comes cannot hold it forever
    kv_timeout_s: float | None = Field(default=None, gt=0)


class ReadyEvent(Message):
    """First line: the prefix the decode node holds (``token_start`` tokens) and its KV address."""

    event: Literal["ready"] = "ready"
    node: str
    token_start: int
    kv_addr: tuple[str, int]


class KVEvent(Message):
    """The KV arrived and was imported (``timings``: the receiver's and the import's stamps)."""

    event: Literal["kv"] = "kv"
    token_start: int
    payload_bytes: int
    wire_bytes: int
    receive_s: float
    timings: dict[str, float | None]


class KVErrorEvent(Message):
    """The KV arrived but the import refused it (e.g. the node lost the prefix meanwhile)."""

    event: Literal["kv_error"] = "kv_error"
    message: str


class TokenLogprobMsg(Message):
    """A sampled token's log-probability and the top alternatives ``[id, logprob]``, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)

    @classmethod
    def of(cls, lp: Any) -> TokenLogprobMsg:
        """The message of an engine's ``TokenLogprob`` (``token_id``, ``logprob``, ``top``)."""
        return cls(token_id=lp.token_id, logprob=lp.logprob, top=list(lp.top))


class PromptScore(Message):
    """The log-probability of each prompt token after the first given the ones before it, and
    the top ``k`` there (``echo`` with ``logprobs``)."""

    prompt_token_ids: list[int] = Field(min_length=1)
    k: int = Field(0, ge=0, le=20)


class PromptScoreResult(Message):
    logprobs: list[TokenLogprobMsg]  # one per prompt token after the first


class TokenEvent(Message):
    """New tokens; the last event of a stream has ``finished`` true; ``logprobs`` (one per new
    token) when the request asked for them."""

    event: Literal["token"] = "token"
    token_ids: list[int]
    logprobs: list[TokenLogprobMsg] | None = None
    finished: bool
    finish_reason: str | None = None
    first_token_at: float | None = None  # the engine sampled the first token (its first event)


class ErrorEvent(Message):
    """The decode failed or was aborted: the stream ends.  ``code``: ``request_failed`` (this
    request alone failed in the engine: sampling, import), ``aborted`` (by the router),
    ``decode_failed`` (anything else: the node's engine step failed, ...)."""

    event: Literal["error"] = "error"
    message: str
    code: Literal["request_failed", "aborted", "decode_failed"] = "decode_failed"


DecodeEvent = Annotated[
    ReadyEvent | KVEvent | KVErrorEvent | TokenEvent | ErrorEvent, Field(discriminator="event")
]
DECODE_EVENT: TypeAdapter[DecodeEvent] = TypeAdapter(DecodeEvent)


def parse_decode_event(line: str | bytes) -> DecodeEvent:
    """One NDJSON line of a decode stream (ValueError if it is not a known event)."""
    return DECODE_EVENT.validate_json(line)


def event_line(ev: Message) -> bytes:
    """One NDJSON line."""
    return ev.to_json() + b"\n"


class AbortResult(Message):
    aborted: bool


# ---- state --------------------------------------------------------------------------------------
class LinkReading(Message):
    """This node's view of its link to one destination cluster."""

    up: bool = True
    gbps: float = 0.0  # measured throughput of its open streams
    capacity_gbps: float = 0.0  # estimated capacity (nominal until measured)
    bytes_in_flight: float = 0.0
    bytes_sent: int = 0  # KV bytes of the hand-offs completed (counted when a send ends)
    bytes_total: int = 0  # bytes written to the wire so far (monotone; counted as they leave)
    busy_s: float = 0.0  # seconds with bytes queued for the link so far (monotone)


class NodeCounters(Message):
    """What a node did since it started."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=False)

    prefills: int = 0
    prefill_failures: int = 0
    bytes_sent: dict[str, int] = Field(default_factory=dict)  # per destination cluster
    imports: int = 0
    import_errors: int = 0


class NodeState(Message):
    """``GET /state``: the readings the gateway polls (queues, cache, links, counters)."""

    name: str
    cluster: str
    role: Literal["prefill", "decode"]
    pid: int
    kv_addr: tuple[str, int] | None = None  # decode nodes: the KV receiver
    waiting: int = 0
    running: int = 0
    pending_tokens: int = 0  # tokens still to compute of waiting and running requests
    expecting: int = 0  # decode: requests whose KV it waits for
    max_num_seqs: int = 0
    cache_usage: float = 0.0  # fraction of the cache's blocks in use
    cache_hit_tokens: int = 0
    cache_query_tokens: int = 0
    prefill_tokens_computed: int = 0
    decode_tokens: int = 0
    links: dict[str, LinkReading] = Field(default_factory=dict)
    stats: NodeCounters = Field(default_factory=NodeCounters)
    pool: dict[str, int | float | bool] | None = None  # prefix pool tier counters, if on


class NodeHealth(Message):
    status: Literal["ok"] = "ok"
    name: str
    role: str
    pid: int


class NodeReady(Message):
    """What a node process writes to its ready file once it serves (its bound ports)."""

    name: str
    cluster: str
    role: str
    host: str
    http_port: int
    kv_port: int
    pid: int


class LinkAdmin(Message):
    """Fault injection: cut (``up`` false) or restore this node's link to ``cluster``."""

    cluster: str = ""
    up: bool


class LinkAdminResult(Message):
    cluster: str
    up: bool
    aborted: int  # in-flight sends aborted by the cut


class RoleAdmin(Message):
    """Switch a drained PD node to another role (the gateway's long-term rebalancing)."""

    role: Literal["prefill", "decode"]


# ---- prefix pool --------------------------------------------------------------------------------
class CacheEvent(Message):
    """A node's holding changed: ``op`` add/drop, ``where`` "node" (its cache) or "pool"."""

    seq: int
    op: Literal["add", "drop"]
    where: Literal["node", "pool"]
    hashes: list[int]


class CacheEventsReply(Message):
    """Events after the asked sequence number; ``reset`` with the full ``node`` holding when the
    node's log no longer has them."""

    seq: int
    reset: bool = False
    node: list[int] = Field(default_factory=list)
    events: list[CacheEvent] = Field(default_factory=list)


class PrefixRequest(Message):
    """The prefix ``prompt_token_ids[:tokens]``."""

    prompt_token_ids: list[int]
    tokens: int

    @model_validator(mode="after")
    def _tokens_in_prompt(self) -> PrefixRequest:
        if not 0 < self.tokens <= len(self.prompt_token_ids):
            raise ValueError("tokens must be an integer in [1, len(prompt_token_ids)]")
        return self


class PrefixCopy(PrefixRequest):
    """Copy the prefix from cluster ``source``'s pool into this node's cluster's pool."""

    source: str


class PrefixPublishResult(Message):
    tokens: int  # the prefix written (resident part of the asked one)
    bytes: int


class PrefixCopyResult(Message):
    bytes: int  # 0: nothing copied (the prefill recomputes)
    tokens: int
    copy_s: float = 0.0


# ---- errors -------------------------------------------------------------------------------------
class ErrorDetail(Message):
    code: str
    message: str


class ErrorBody(Message):
    error: ErrorDetail


def error_message(text: str | bytes) -> str:
    """The message of a node's error answer (the raw text, cut, when it is not an ErrorBody)."""
    try:
        return ErrorBody.model_validate_json(text).error.message
    except ValueError:
        raw = text.decode(errors="replace") if isinstance(text, bytes) else text
        return raw[:200]


def error_code(text: str | bytes) -> str | None:
    """The code of a node's error answer (None when it is not an ErrorBody)."""
    try:
        return ErrorBody.model_validate_json(text).error.code
    except ValueError:
        return None


def dump(msg: Message) -> dict[str, Any]:
    """A message as a JSON-ready dict (for JSONResponse bodies)."""
    return msg.model_dump(mode="json")
