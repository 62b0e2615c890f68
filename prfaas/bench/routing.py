"""The ``prfaas`` routing information a server may attach to a response.

Read from ``x-prfaas-*`` response headers (``x-prfaas-prefill-cluster: prfaas``) and from a
``prfaas`` object in any JSON body / stream chunk (``{"prfaas": {"prefill_cluster": "prfaas"}}``);
header names map to keys with ``-`` -> ``_``; body values win over headers. OpenAI-style
``usage.prompt_tokens_details.cached_tokens`` (vLLM, SGLang) fills ``cached_tokens`` when nothing else
does. Known keys are typed; unknown keys are kept as given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

HEADER_PREFIX = "x-prfaas-"
INT_KEYS = (
    "cached_tokens",
    "uncached_tokens",
    "prompt_tokens",
    "decode_prefix_tokens",
    "transfer_bytes",
    "transfer_wire_bytes",
)
FLOAT_KEYS = ("transfer_ms", "prefill_ms")
BOOL_KEYS = ("offloaded",)
STR_KEYS = (
    "request_id",
    "prefill_cluster",
    "decode_cluster",
    "prefill_node",
    "decode_node",
    "prefill_instance",
    "decode_instance",
    "route",
    "reason",
    "link",
)
DROPPED_KEYS = ("token_ids",)  # the output itself: not routing, and large


def _typed(key: str, value: Any) -> Any:
    try:
        if key in INT_KEYS:
            return int(value)
        if key in FLOAT_KEYS:
            return float(value)
        if key in BOOL_KEYS:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "y")
            return bool(value)
        if key in STR_KEYS:
            return str(value)
    except (TypeError, ValueError):
        return value
    return value


def from_headers(headers: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``x-prfaas-*`` headers as typed keys."""
    out: dict[str, Any] = {}
    for name, value in headers:
        n = name.lower()
        if n.startswith(HEADER_PREFIX) and len(n) > len(HEADER_PREFIX):
            key = n[len(HEADER_PREFIX) :].replace("-", "_")
            out[key] = _typed(key, value)
    return out


def merge_body(routing: dict[str, Any], obj: Mapping[str, Any]) -> None:
    """Merge a body's / chunk's ``prfaas`` object and usage cached tokens into ``routing``."""
    info = obj.get("prfaas")
    if isinstance(info, Mapping):
        for k, v in info.items():
            if str(k) not in DROPPED_KEYS:
                routing[str(k)] = _typed(str(k), v)
    usage = obj.get("usage")
    if isinstance(usage, Mapping) and "cached_tokens" not in routing:
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping) and details.get("cached_tokens") is not None:
            routing["cached_tokens"] = _typed("cached_tokens", details["cached_tokens"])


def offloaded(routing: Mapping[str, Any]) -> bool | None:
    """Whether the prefill ran on another cluster than the decode: the explicit ``offloaded`` flag,
    else ``prefill_cluster != decode_cluster`` when both are known; ``None`` if unknown."""
    if isinstance(routing.get("offloaded"), bool):
        return routing["offloaded"]
    p, d = routing.get("prefill_cluster"), routing.get("decode_cluster")
    if p is not None and d is not None:
        return p != d
    return None
