"""What the ControlNet optimization tests share: a tiny SD1.5 checkpoint with two tiny nets, and control images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
from gesso_controlnet.tiny import write_tiny_controlnet


def write_base_and_nets(root: Path) -> dict:
    """``{"base": folder, "nets": [folder, folder]}``: the nets differ (seeds 0 and 1)."""
    from gesso_sd15.tiny import write_tiny_checkpoint

    return {"base": write_tiny_checkpoint(root / "base"), "nets": [write_tiny_controlnet(root / f"net{i}", seed=i) for i in range(2)]}


def control_image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
