"""Which device notebooks and tests run on.

The math functions never choose a device: they compute wherever their inputs live and refuse
inputs on mixed devices. Only the code that *creates* tensors (notebooks, tests, scripts) asks here.
"""
from __future__ import annotations

import os

import torch

from .errors import LoraxInputError

ENV_VAR = "LORAX_DEVICE"


def default_device() -> torch.device:
    """``$LORAX_DEVICE`` if set (``cpu``, ``cuda``, ``cuda:1``), else CUDA when present, else CPU."""
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LoraxInputError(f"{ENV_VAR}={name!r} is not a torch device name ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraxInputError(f"{ENV_VAR}={name!r} asks for CUDA, but torch sees no CUDA device")
    return device


def available_devices() -> list[torch.device]:
    """CPU always, plus the first CUDA device when one is present (for test parametrisation)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices
