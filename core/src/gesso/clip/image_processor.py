"""gesso's CLIP image processor: ``preprocessor_config.json`` in, ``pixel_values`` out.

It computes what transformers' ``CLIPImageProcessor`` computes on its PIL backend (the one it uses
when torchvision is absent), bit for bit, without importing transformers. Per image:

1. to RGB: transparency is composited onto white (PIL's ``alpha_composite`` for PIL images, a
   rounded blend for arrays), grey is repeated; then channels first;
2. resize with PIL on 8-bit pixels: ``shortest_edge`` scales the short side to that size and the
   long side to ``int(size * long / short)`` (truncated); float pixels in [0, 1] go through
   ``uint8(x * 255)`` (truncated) and come back divided by 255;
3. center crop at ``(H - h) // 2, (W - w) // 2``; a smaller image is first centred on zeros;
4. rescale (``float64(x) * factor`` stored as float32), then ``(x - mean) / std`` in float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from gesso.clip import Batch
from gesso.configuration import read_json_object
from gesso.output import write_atomic

__all__ = ["BatchFeature", "CLIPImageProcessor", "ImageProcessorConfigError"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"

_VALID_SIZE_KEYS = (
    {"height", "width"},
    {"shortest_edge"},
    {"shortest_edge", "longest_edge"},
    {"longest_edge"},
    {"max_height", "max_width"},
    {"min_pixels", "max_pixels"},
)
_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL's BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_convert_rgb": True,
}


class ImageProcessorConfigError(ValueError):
    """``preprocessor_config.json`` is missing or malformed; the message names the file."""


class BatchFeature(Batch):
    """``pixel_values`` by key or attribute, as the reference returns it."""

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Tensors moved or cast with ``torch.Tensor.to``'s arguments."""
        return self._mapped(lambda value: value.to(*args, **kwargs))


def size_dict(size: Any, default_to_square: bool, name: str = "size") -> dict[str, int]:
    """The reference's reading of a size: an int is a square (``default_to_square``) or the
    shortest edge, a pair is ``(height, width)``, a dict must use one of its key sets."""
    if isinstance(size, bool):
        raise ValueError(f"{name} must be an int, a pair or a dict, not {size!r}")
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, list | tuple) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if (
        isinstance(size, dict)
        and set(size) in _VALID_SIZE_KEYS
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size.values())
    ):
        return dict(size)
    raise ValueError(
        f"{name} must be an int, a (height, width) pair or a dict with keys {[sorted(k) for k in _VALID_SIZE_KEYS]}, not {size!r}"
    )


class CLIPImageProcessor:
    """CLIP's image preprocessing with the reference's settings and call signature.

    Settings (each ``None`` or absent means the CLIP default): ``do_resize``, ``size``, ``resample``
    (a PIL filter code), ``do_center_crop``, ``crop_size``, ``do_rescale``, ``rescale_factor``,
    ``do_normalize``, ``image_mean``, ``image_std``, ``do_convert_rgb``. Other keys are kept and
    written back by :meth:`save_pretrained`.
    """

    #: Pipelines save it as transformers' ``CLIPImageProcessor``, which reads the same file.
    model_index_library = "transformers"
    model_input_names = ["pixel_values"]

    def __init__(self, **settings: Any) -> None:
        if settings.pop("use_square_size", False):  # an older spelling of a square resize
            edge = size_dict(settings.get("size") or _DEFAULTS["size"], default_to_square=False)["shortest_edge"]
            settings["size"] = {"height": edge, "width": edge}
        self._extra = {k: v for k, v in settings.items() if k not in _DEFAULTS}
        values = {k: (_DEFAULTS[k] if settings.get(k) is None else settings[k]) for k in _DEFAULTS}
        self.do_resize = bool(values["do_resize"])
        self.size = size_dict(values["size"], default_to_square=False)
        self.resample = int(values["resample"])
        self.do_center_crop = bool(values["do_center_crop"])
        self.crop_size = size_dict(values["crop_size"], default_to_square=True, name="crop_size")
        self.do_rescale = bool(values["do_rescale"])
        self.rescale_factor = float(values["rescale_factor"])
        self.do_normalize = bool(values["do_normalize"])
        self.image_mean = _floats(values["image_mean"], "image_mean")
        self.image_std = _floats(values["image_std"], "image_std")
        self.do_convert_rgb = bool(values["do_convert_rgb"])

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: str | None = None, **hub_options: Any
    ) -> CLIPImageProcessor:
        """Read ``preprocessor_config.json`` from a folder (or a Hub repository's ``subfolder``);
        ``hub_options`` are ``cache_dir``, ``revision``, ``local_files_only`` and ``token``."""
        from gesso.loading import resolve_component_folder

        path = Path(resolve_component_folder(pretrained_model_name_or_path, subfolder, **hub_options)) / CONFIG_NAME
        data = read_json_object(path, ImageProcessorConfigError)
        assert data is not None  # required
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ImageProcessorConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``preprocessor_config.json`` stores them (kept extra keys included)."""
        return {
            **self._extra,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": dict(self.crop_size),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean) if isinstance(self.image_mean, tuple) else self.image_mean,
            "image_std": list(self.image_std) if isinstance(self.image_std, tuple) else self.image_std,
            "do_convert_rgb": self.do_convert_rgb,
            "image_processor_type": "CLIPImageProcessor",
        }

    def save_pretrained(self, save_directory: str | os.PathLike[str], **unused: Any) -> list[str]:
        """Write ``preprocessor_config.json``, which transformers' loader reads too."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        write_atomic((json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8"), path)
        return [str(path)]

    def __repr__(self) -> str:
        return f"CLIPImageProcessor({json.dumps(self.to_dict(), sort_keys=True)})"

    # ------------------------------------------------------------------------------- processing

    def __call__(self, images: Any, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(self, images: Any, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        """``pixel_values`` for one image or a list: PIL images, ``HWC``/``CHW`` arrays or tensors
        (uint8, or floats in [0, 1]; a 4-D array is a batch). ``return_tensors``: ``"pt"`` gives an
        ``(N, 3, H, W)`` tensor, ``"np"`` an array, ``None`` a list of arrays. ``overrides`` replace
        settings for this call."""
        unknown = set(overrides) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        settings = self if not overrides else type(self)(**{**self.to_dict(), **overrides})
        arrays = [settings._process_one(image) for image in _flat_images(images)]
        if return_tensors is None:
            return BatchFeature(pixel_values=arrays)
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("Unable to create tensor: the processed images differ in size (set do_resize/do_center_crop)")
        stacked = np.stack(arrays) if arrays else np.zeros((0, 3, 0, 0), np.float32)
        if return_tensors == "np":
            return BatchFeature(pixel_values=stacked)
        if return_tensors == "pt":
            import torch

            return BatchFeature(pixel_values=torch.from_numpy(stacked))
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, not {return_tensors!r}")

    def _process_one(self, image: Any) -> np.ndarray:
        pixels = _channels_first(image, self.do_convert_rgb)
        if self.do_resize:
            pixels = _resize(pixels, _output_size(pixels.shape[-2], pixels.shape[-1], self.size), self.resample)
        if self.do_center_crop:
            if "height" not in self.crop_size:
                raise ValueError(f"crop_size must have height and width, not {self.crop_size}")
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = _normalize(pixels, self.image_mean, self.image_std)
        return pixels


def _floats(value: Any, name: str) -> float | tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(f"{name} must be a number or a list of numbers, not {value!r}")


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _flat_images(images: Any) -> list[Any]:
    """One image, a list, a list of lists, or a 4-D array/tensor, as a flat list of images."""
    if isinstance(images, list | tuple):
        flat: list[Any] = []
        for item in images:
            flat.extend(_flat_images(item) if isinstance(item, list | tuple) or _ndim(item) == 4 else [item])
        if not flat:
            raise ValueError("no images given")
        return flat
    if _ndim(images) == 4:
        return list(images)
    return [images]


def _ndim(value: Any) -> int | None:
    return None if isinstance(value, PIL.Image.Image) else getattr(value, "ndim", None)


def _channels_first(image: Any, convert_rgb: bool) -> np.ndarray:
    """Step 1: ``(C, H, W)`` pixels, RGB when asked."""
    if isinstance(image, PIL.Image.Image):
        array = np.array(_pil_to_rgb(image) if convert_rgb else image)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if _is_tensor(image):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"images must be PIL images, numpy arrays or torch tensors, not {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"an image array must be HxWxC or CxHxW, not of shape {image.shape}")
    channel_axis = 0 if image.shape[0] in (1, 3, 4) else -1 if image.shape[-1] in (1, 3, 4) else None
    if channel_axis is None:
        raise ValueError(f"cannot tell the channels of an image of shape {image.shape} (1, 3 or 4 first or last)")
    image = np.moveaxis(image, channel_axis, 0)
    return _array_to_rgb(image) if convert_rgb else image


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey repeated to three channels; RGBA blended onto white (8-bit rounded, floats kept)."""
    channels = image.shape[0]
    if channels == 1:
        return np.repeat(image, 3, axis=0)
    if channels != 4:
        return image
    integer = np.issubdtype(image.dtype, np.integer)
    if not integer and (image.min() < 0.0 or image.max() > 1.0):
        raise ValueError(f"an RGBA float image must lie in [0, 1], not [{image.min()}, {image.max()}]")
    white = 255 if integer else 1.0
    alpha = image[3:4] / white
    blended = alpha * image[:3] + (1 - alpha) * white
    return np.round(blended).astype(image.dtype) if integer else blended.astype(image.dtype)


def _output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Step 2's target ``(height, width)`` for each kind of size setting."""
    if "shortest_edge" in size and "longest_edge" in size:
        return _shortest_longest(height, width, size["shortest_edge"], size["longest_edge"])
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    if "height" in size:
        return size["height"], size["width"]
    raise ValueError(f"size {size} cannot be used to resize (give shortest_edge, height and width, or max_height and max_width)")


def _shortest_longest(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """The short side to ``shortest`` unless the long one would pass ``longest`` (then that wins)."""
    raw = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * shortest > longest:
        raw = longest * low / high
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return int((raw if raw is not None else shortest) * height / width), shortest
    return shortest, int((raw if raw is not None else shortest) * width / height)


def _needs_scaling_to_bytes(pixels: np.ndarray) -> bool:
    """Whether float pixels are in [0, 1] and must be scaled by 255 to become 8-bit for PIL.
    Integer-valued floats in [0, 255] are taken as they are, as in the reference."""
    if pixels.dtype == np.uint8:
        return False
    if np.allclose(pixels, pixels.astype(int)):
        if np.all(pixels >= 0) and np.all(pixels <= 255):
            return False
        raise ValueError(f"image values must lie in [0, 255], not [{pixels.min()}, {pixels.max()}]")
    if np.all(pixels >= 0) and np.all(pixels <= 1):
        return True
    raise ValueError(f"float image values must lie in [0, 1], not [{pixels.min()}, {pixels.max()}]")


def _resize(pixels: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Step 2: PIL resizes 8-bit pixels; floats in [0, 1] go there and back through 255."""
    scaled = _needs_scaling_to_bytes(pixels)
    hwc = np.moveaxis(pixels, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if scaled:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
    resized = np.array(PIL.Image.fromarray(hwc.astype(np.uint8)).resize((size[1], size[0]), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., None]
    resized = np.moveaxis(resized, -1, 0)
    return (resized.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else resized


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Step 3: the centred ``height x width`` window, floor offsets; zeros pad a smaller image."""
    old_height, old_width = pixels.shape[-2:]
    top, left = (old_height - height) // 2, (old_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[..., top : top + height, left : left + width]
    new_height, new_width = max(height, old_height), max(width, old_width)
    canvas = np.zeros(pixels.shape[:-2] + (new_height, new_width), dtype=pixels.dtype)
    pad_top, pad_left = -(-(new_height - old_height) // 2), -(-(new_width - old_width) // 2)
    canvas[..., pad_top : pad_top + old_height, pad_left : pad_left + old_width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[..., max(0, top) : min(new_height, top + height), max(0, left) : min(new_width, left + width)]


def _normalize(pixels: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """Step 4: ``(x - mean) / std`` per channel, in float32 unless the pixels are another float."""
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    channels = pixels.shape[0]
    means = [mean] * channels if isinstance(mean, float) else list(mean)
    stds = [std] * channels if isinstance(std, float) else list(std)
    if len(means) != channels or len(stds) != channels:
        raise ValueError(f"image_mean and image_std need {channels} values, one per channel")
    mean_array = np.array(means, dtype=pixels.dtype)[:, None, None]
    std_array = np.array(stds, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean_array) / std_array
