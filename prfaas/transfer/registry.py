"""The transfer backends by name: ``create_sender(name, ...)`` / ``create_receiver(name, ...)``.

Backend modules are imported on first use (Mooncake's import is slow and optional).
"""

from __future__ import annotations

from typing import Any

from prfaas.transfer.receiver import ReceiverBase
from prfaas.transfer.sender import SenderBase


def backend_names() -> list[str]:
    return ["tcp", "mooncake"]


def _classes(name: str) -> tuple[type[SenderBase], type[ReceiverBase]]:
    if name == "tcp":
        from prfaas.transfer.tcp import TcpReceiver, TcpSender

        return TcpSender, TcpReceiver
    if name == "mooncake":
        from prfaas.transfer.mooncake_backend import MooncakeReceiver, MooncakeSender

        return MooncakeSender, MooncakeReceiver
    raise ValueError(f"unknown transfer backend {name!r}; choose from {backend_names()}")


def create_sender(backend: str, *args: Any, **kwargs: Any) -> SenderBase:
    """A sender of the named backend (arguments as ``SenderBase``)."""
    return _classes(backend)[0](*args, **kwargs)


def create_receiver(backend: str, *args: Any, **kwargs: Any) -> ReceiverBase:
    """A receiver of the named backend (arguments as ``ReceiverBase``); call ``start()``."""
    return _classes(backend)[1](*args, **kwargs)
