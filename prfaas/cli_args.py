"""Argument types and checks shared by the commands (no torch): each refuses a bad value with a
message argparse prints as one line (``prfaas CMD: error: ...``, exit status 2), before any work
or process starts."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import NoReturn


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {v}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is there is checked by the command
    that uses it, once it loads torch)."""
    ok = text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())
    if not ok:
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def check_bindable(host: str, port_: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None (the socket is closed again)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port_))
    except OSError as e:
        return f"cannot listen on {host}:{port_}: {e.strerror or e}"
    return None


def check_cuda(dev: str) -> str | None:
    """Why ``dev`` cannot be used (imports torch), or None."""
    if not dev.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"device {dev!r}: CUDA is not available on this machine (use --device cpu)"
    if ":" in dev and int(dev.split(":")[1]) >= torch.cuda.device_count():
        return f"device {dev!r}: only {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_tp_devices(dev: str, tensor_parallel_size: int) -> str | None:
    """Why ``tensor_parallel_size`` ranks cannot start from device ``dev`` (one GPU a rank:
    ``cuda:N`` .. ``cuda:N+size-1``; imports torch for CUDA devices), or None."""
    if tensor_parallel_size <= 1 or dev == "cpu":
        return None
    import torch

    if dev == "auto" and not torch.cuda.is_available():
        return None
    first = int(dev.split(":")[1]) if ":" in dev else 0
    n = torch.cuda.device_count()
    if first + tensor_parallel_size > n:
        return (
            f"--tensor-parallel-size {tensor_parallel_size} on {dev} needs GPUs "
            f"cuda:{first}..cuda:{first + tensor_parallel_size - 1}; {n} visible"
        )
    return None


def check_tp_model(model: str, tensor_parallel_size: int) -> str | None:
    """Why ``model`` (a preset or directory) cannot be split over ``tensor_parallel_size`` ranks
    (imports the model package), or None."""
    if tensor_parallel_size <= 1:
        return None
    from prfaas.model.config import resolve_config
    from prfaas.model.tp.shard import check_tp

    try:
        return check_tp(resolve_config(model), tensor_parallel_size)
    except ValueError as e:
        return str(e)


def fail(prog: str, message: str) -> NoReturn:
    """The one line every command's argument error prints, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
