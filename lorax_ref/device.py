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
    return parse_device(name, ENV_VAR)


def parse_device(name, what: str = "device") -> torch.device:
    """A device this torch build can compute on: ``cpu``, ``cuda[:i]`` when CUDA sees device ``i``, ``mps``
    when present; anything else (``meta``, a typo, CUDA on a CPU-only build) is a LoraxInputError."""
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise LoraxInputError(f"{what}={name!r} is not a torch device name ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraxInputError(f"{what}={name!r} asks for CUDA, but torch sees no CUDA device "
                                  f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraxInputError(f"{what}={name!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise LoraxInputError(f"{what}={name!r} asks for MPS, but torch sees no MPS device")
    elif device.type != "cpu":
        raise LoraxInputError(f"{what}={name!r} is not a device to compute on (use cpu or cuda)")
    return device


def available_devices() -> list[torch.device]:
    """CPU always, plus the first CUDA device when one is present (for test parametrisation)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices
