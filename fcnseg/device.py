"""The torch device a command runs on, checked before any work: a named device this machine lacks is one clear
error, not a failure deep inside a checkpoint read."""

from __future__ import annotations

import torch

from .errors import FcnsegError


def pick_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against the machine."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FcnsegError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FcnsegError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise FcnsegError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
