"""Where compiled artifacts live on disk, and the parts of their keys that every kind shares."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cache_dir(variable: str, name: str) -> Path:
    """``$variable``, else ``$XDG_CACHE_HOME/gesso/<name>`` (``~/.cache/gesso/<name>``)."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gesso" / name


def tensor_signature(tensor: torch.Tensor) -> list[Any]:
    """What compiled code assumes of a tensor: shape, strides, dtype and device type."""
    return [list(tensor.shape), list(tensor.stride()), str(tensor.dtype), tensor.device.type]


def device_signature(device: torch.device) -> str:
    """The code a device runs: a GPU's compute capability, a CPU's architecture."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return f"{device.type}-{platform.machine()}"
