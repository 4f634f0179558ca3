"""Tiny ControlNet checkpoints written by the reference library's own ``save_pretrained`` (test-only oracle).

The configs are gesso-controlnet's tiny ones (matching the families' tiny UNets); weights are random,
drawn here, with the zero-initialised output projections made non-zero so that every path counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

#: An OpenPose-like skeleton: (x, y) joints on a 0..1 canvas, limbs as joint index pairs.
POSE_JOINTS = [
    (0.5, 0.12),
    (0.5, 0.28),
    (0.36, 0.3),
    (0.3, 0.48),
    (0.28, 0.64),
    (0.64, 0.3),
    (0.7, 0.48),
    (0.74, 0.62),
    (0.42, 0.62),
    (0.4, 0.8),
    (0.4, 0.96),
    (0.58, 0.62),
    (0.6, 0.8),
    (0.62, 0.96),
]
POSE_LIMBS = [(0, 1), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13)]


def pose_image(width: int = 48, height: int = 40, shift: float = 0.0) -> Image.Image:
    """A pose-like control image: coloured limbs and joints on black, as OpenPose detectors draw them."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    points = [((x + shift) * (width - 1), y * (height - 1)) for x, y in POSE_JOINTS]
    for index, (a, b) in enumerate(POSE_LIMBS):
        hue = index / len(POSE_LIMBS)
        colour = tuple(int(255 * max(0.0, min(1.0, abs(hue * 6 - k) - 1 if k == 3 else 2 - abs(hue * 6 - k)))) for k in (3, 2, 4))
        draw.line([points[a], points[b]], fill=colour, width=max(1, width // 24))
    for x, y in points:
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 0, 0))
    return image


def write_reference_controlnet(
    folder: Path, *, config: dict[str, Any] | None = None, seed: int = 0, variant: str | None = None, **overrides: Any
) -> Path:
    import diffusers
    from gesso_controlnet.tiny import SD15_CONFIG, randomise

    torch.manual_seed(seed)
    net = diffusers.ControlNetModel(**{**(config or SD15_CONFIG), **overrides})
    randomise(net, seed + 100)  # the plugin's own recipe, so both sides' tiny nets look alike
    if variant == "fp16":
        net = net.to(torch.float16)
    net.save_pretrained(folder, variant=variant)
    return folder
