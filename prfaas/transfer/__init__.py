"""Moving a request's KV cache between nodes: wire format, backends, link emulation, monitor.

See docs/transfer.md. Entry points: ``create_sender`` / ``create_receiver`` with a ``CacheLayout``.
"""

from prfaas.transfer.backend import (
    Delivery,
    SendStats,
    TransferFailure,
    TransferTimings,
    backend_names,
    create_receiver,
    create_sender,
)
from prfaas.transfer.errors import (
    AbortedError,
    AuthError,
    BackendError,
    CapacityError,
    ChecksumError,
    FrameError,
    LayoutMismatch,
    PeerClosed,
    TransferError,
)
from prfaas.transfer.layout import CacheLayout, TensorSpec
from prfaas.transfer.link import LinkEmulator, LinkSpec
from prfaas.transfer.monitor import LinkMonitor, LinkSnapshot
from prfaas.transfer.unit import KVExport, LayerPart, TransferHeader

__all__ = [
    "AbortedError",
    "AuthError",
    "BackendError",
    "CacheLayout",
    "CapacityError",
    "ChecksumError",
    "Delivery",
    "FrameError",
    "KVExport",
    "LayerPart",
    "LayoutMismatch",
    "LinkEmulator",
    "LinkMonitor",
    "LinkSnapshot",
    "LinkSpec",
    "PeerClosed",
    "SendStats",
    "TensorSpec",
    "TransferError",
    "TransferFailure",
    "TransferHeader",
    "TransferTimings",
    "backend_names",
    "create_receiver",
    "create_sender",
]
