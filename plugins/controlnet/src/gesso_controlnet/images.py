"""Control images: PIL images, numpy arrays or tensors (or lists of them) -> an NCHW float tensor in [0, 1].

The conversions are the reference pipelines' (``VaeImageProcessor`` without normalisation): PIL images
are resized with Lanczos and converted to RGB; arrays and tensors are resized with nearest-neighbour
interpolation; a tensor with as many channels as the VAE's latents is taken as it is. Without a given
size, the image's own size is rounded down to a multiple of the VAE's scale factor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.nn import functional as F

LATENT_CHANNELS = 4


def is_image(value: Any) -> bool:
    return isinstance(value, PIL.Image.Image) or (isinstance(value, np.ndarray | torch.Tensor) and value.ndim in (2, 3))


def is_image_or_batch(value: Any) -> bool:
    if isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 4:
        return True
    if is_image(value):
        return True
    return isinstance(value, list) and len(value) > 0 and all(is_image(item) for item in value)


def kind_ok(image: Any) -> bool:
    """The types ``check_inputs`` accepts: an image, an array or tensor, or a list starting with one."""
    if isinstance(image, PIL.Image.Image | np.ndarray | torch.Tensor):
        return True
    return isinstance(image, list) and len(image) > 0 and isinstance(image[0], PIL.Image.Image | np.ndarray | torch.Tensor)


def batch_size(image: Any) -> int:
    return 1 if isinstance(image, PIL.Image.Image) else len(image)


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 3:  # a batch of single-channel images
        array = array[..., None]
    return torch.from_numpy(array.transpose(0, 3, 1, 2))


def natural_size(image: Any, scale_factor: int) -> tuple[int, int] | None:
    """(height, width) one net's image is prepared at when no size is given; None for an unusable image."""
    first = image[0] if isinstance(image, list) and image else image
    if isinstance(first, PIL.Image.Image):
        height, width = first.height, first.width
    elif isinstance(first, np.ndarray) and first.ndim in (2, 3, 4):  # HW, HWC or NHWC
        height, width = first.shape[1:3] if first.ndim == 4 else first.shape[:2]
    elif isinstance(first, torch.Tensor) and first.ndim in (3, 4):  # CHW or NCHW
        height, width = first.shape[-2:]
        if first.shape[-3] == LATENT_CHANNELS:  # taken as it is, not resized
            return int(height), int(width)
    else:
        return None
    return int(height) - int(height) % scale_factor, int(width) - int(width) % scale_factor


def preprocess(image: Any, height: int, width: int) -> torch.Tensor:
    """One net's control image(s) -> float32 ``(N, C, height, width)`` in [0, 1]."""
    if isinstance(image, list) and image and isinstance(image[0], np.ndarray | torch.Tensor) and image[0].ndim == 4:
        image = np.concatenate(image, axis=0) if isinstance(image[0], np.ndarray) else torch.cat(image, dim=0)
    if not is_image_or_batch(image):
        raise ValueError("control image: expected a PIL image, a numpy array or a torch tensor, or a list of them")
    images = image if isinstance(image, list) else [image]
    if isinstance(images[0], PIL.Image.Image):
        resized = [img.resize((width, height), resample=PIL.Image.Resampling.LANCZOS).convert("RGB") for img in images]
        array = np.stack([np.array(img).astype(np.float32) / 255.0 for img in resized], axis=0)
        return _numpy_to_tensor(array)
    if isinstance(images[0], np.ndarray):
        array = np.concatenate(images, axis=0) if images[0].ndim == 4 else np.stack(images, axis=0)
        tensor = _numpy_to_tensor(array)
    else:
        tensor = torch.cat(images, dim=0) if images[0].ndim == 4 else torch.stack(images, dim=0)
        if tensor.shape[1] == LATENT_CHANNELS:
            return tensor.float()
    return F.interpolate(tensor, size=(height, width)).float()
