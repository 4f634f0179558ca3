"""Conversions between decoded tensors, numpy arrays and PIL images, as the reference performs them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def denormalize(images: torch.Tensor, mask: list[bool] | None = None) -> torch.Tensor:
    """[-1, 1] -> [0, 1]; images whose ``mask`` entry is False are left as they are."""
    if mask is None or all(mask):
        return (images / 2 + 0.5).clamp(0, 1)
    return torch.stack([(img / 2 + 0.5).clamp(0, 1) if keep else img for img, keep in zip(images, mask, strict=True)])


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """NCHW float tensor -> NHWC float32 numpy array."""
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    if images.ndim == 3:
        images = images[None, ...]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(img.squeeze(), mode="L") for img in images]
    return [Image.fromarray(img) for img in images]


def postprocess(images: torch.Tensor, output_type: str = "pil", mask: list[bool] | None = None) -> Any:
    """Decoded images in [-1, 1] -> the requested output type."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")
    if output_type == "latent":
        return images
    images = denormalize(images, mask)
    if output_type == "pt":
        return images
    array = to_numpy(images)
    return array if output_type == "np" else numpy_to_pil(array)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> CHW float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)
