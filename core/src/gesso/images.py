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
    return _pil_images((images * 255).round().astype("uint8"))


def _pil_images(pixels: np.ndarray) -> list[Image.Image]:
    """NHWC 8-bit pixels -> one PIL image each (grey where there is one channel)."""
    if pixels.shape[-1] == 1:
        return [Image.fromarray(img.squeeze(), mode="L") for img in pixels]
    return [Image.fromarray(img) for img in pixels]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """NCHW tensor in [0, 1] -> PIL images, the pixels of ``numpy_to_pil(to_numpy(images))``.

    The scaling and rounding run where the tensor is, in float32 as numpy does them (an exact
    multiplication, then rounding half to even), so only the 8-bit pixels cross to the CPU: a
    quarter of the bytes, and no float passes over the image on the CPU (6 ms of a 0.35 s SD1.5
    image on an H200 before, ``benchmarks/NOTES.md``).
    """
    return _pil_images((images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy())


def postprocess(images: torch.Tensor, output_type: str = "pil", mask: list[bool] | None = None) -> Any:
    """Decoded images in [-1, 1] -> the requested output type."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")
    if output_type == "latent":
        return images
    images = denormalize(images, mask)
    if output_type == "pt":
        return images
    return to_numpy(images) if output_type == "np" else tensor_to_pil(images)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> CHW float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)
