"""Typed errors of the transfer layer; every refusal raises one of these."""

from __future__ import annotations


class TransferError(Exception):
    """Base class: a transfer could not be completed; nothing was delivered."""

    code = "transfer"


class AuthError(TransferError):
    """The peer failed (or refused) the shared-secret challenge-response."""

    code = "auth"


class ChecksumError(TransferError):
    """A header or layer checksum did not match its bytes."""

    code = "checksum"


class LayoutMismatch(TransferError):
    """The announced cache does not fit the receiver's ``CacheLayout``."""

    code = "layout"


class FrameError(TransferError):
    """A malformed, oversized, truncated or unexpected frame."""

    code = "frame"


class PeerClosed(TransferError):
    """The peer went away (connection closed or reset) before the transfer ended."""

    code = "closed"


class CapacityError(TransferError):
    """The receiver has no room (memory limit) for the announced cache."""

    code = "capacity"


class AbortedError(TransferError):
    """The sender aborted the stream."""

    code = "aborted"


class BackendError(TransferError):
    """The bulk-transfer backend (e.g. Mooncake) reported a failure."""

    code = "backend"


_BY_CODE: dict[str, type[TransferError]] = {
    c.code: c
    for c in (
        TransferError,
        AuthError,
        ChecksumError,
        LayoutMismatch,
        FrameError,
        PeerClosed,
        CapacityError,
        AbortedError,
        BackendError,
    )
}


def error_from_code(code: str, message: str) -> TransferError:
    """Rebuild the typed error a peer reported by its code."""
    return _BY_CODE.get(code, TransferError)(message)
