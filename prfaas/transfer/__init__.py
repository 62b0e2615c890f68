"""Moving a request's KV cache between nodes: bytes and layouts, never the engine.

See docs/transfer.md. Entry points: ``create_sender`` / ``create_receiver`` (``registry``) with a
``prfaas.kv.CacheLayout``; the interfaces are in ``backend``. Names below are imported lazily so
that ``prfaas.transfer.link`` (link shaping) can be used without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Delivery": "backend",
    "LayerArrival": "backend",
    "Receiver": "backend",
    "SendStats": "backend",
    "Sender": "backend",
    "SenderStream": "backend",
    "TransferFailure": "backend",
    "TransferTimings": "backend",
    "backend_names": "registry",
    "create_receiver": "registry",
    "create_sender": "registry",
    "AbortedError": "errors",
    "AuthError": "errors",
    "BackendError": "errors",
    "CapacityError": "errors",
    "ChecksumError": "errors",
    "FrameError": "errors",
    "LayoutMismatch": "errors",
    "PeerClosed": "errors",
    "TransferError": "errors",
    "LinkShaper": "link",
    "LinkShaperSpec": "link",
    "LinkMeter": "meter",
    "LinkSnapshot": "meter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'prfaas.transfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"prfaas.transfer.{mod}"), name)
