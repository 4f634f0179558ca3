"""Writing images (atomically, with metadata) and reading a run back from an image.

Each PNG carries two text chunks: ``parameters`` in the AUTOMATIC1111 format, which other tools
read, and ``gesso``, the resolved run config as YAML, which ``gesso run --from`` replays.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

#: Scheduler short names -> the sampler names AUTOMATIC1111 writes.
A1111_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PLMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpmpp_2s": "DPM++ 2S",
    "unipc": "UniPC",
    "deis": "DEIS",
    "lcm": "LCM",
    "kdpm2": "DPM2",
    "kdpm2_a": "DPM2 a",
}

_CLASS_TO_SHORT = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpmpp_2s",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
    "LCMScheduler": "lcm",
    "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_a",
}


class MetadataError(ValueError):
    """An image carries no gesso run config, or an unreadable one."""


def sampler_name(scheduler: str) -> str:
    short = _CLASS_TO_SHORT.get(scheduler, scheduler)
    return A1111_SAMPLERS.get(short, scheduler)


def a1111_parameters(values: Mapping[str, Any], scheduler: str, batch_size: int = 1, batch_pos: int = 0) -> str:
    """The ``parameters`` text: prompt, ``Negative prompt: ...`` and one line of settings."""
    prompt = values.get("prompt") or ""
    negative = values.get("negative_prompt")
    settings = [
        ("Steps", values.get("num_inference_steps")),
        ("Sampler", sampler_name(scheduler) if scheduler else None),
        ("CFG scale", values.get("guidance_scale")),
        ("Seed", values.get("seed")),
        ("Size", f"{values.get('width')}x{values.get('height')}"),
        ("Model", str(values.get("model", "")).rstrip("/").rsplit("/", 1)[-1]),
    ]
    if batch_size > 1:
        settings += [("Batch size", batch_size), ("Batch pos", batch_pos)]
    lines = [str(prompt)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings if v is not None))
    return "\n".join(lines)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where the platform lets a folder be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - folders cannot be opened on some platforms
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(handle)


def write_atomic(data: bytes, path: Path) -> None:
    """Temporary file, flush, fsync, rename, fsync of the folder: the file is whole or absent."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name.removesuffix('.png')}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_png(image: Image.Image, path: str | Path, text_chunks: Mapping[str, str]) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`write_atomic`): never a truncated PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_itxt(key, value)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info)
    write_atomic(encoded.getvalue(), path)
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Atomic text write (the resolved config beside the images)."""
    path = Path(path)
    write_atomic(text.encode("utf-8"), path)
    return path


def read_text_chunks(path: str | Path) -> dict[str, str]:
    try:
        with Image.open(path) as image:
            image.load()
            return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
    except FileNotFoundError:
        raise MetadataError(f"image {path} does not exist") from None
    except OSError as err:
        raise MetadataError(f"image {path}: cannot be read ({err})") from None


def read_run_config(path: str | Path) -> str:
    """The resolved run config (YAML) stored in a gesso PNG."""
    chunks = read_text_chunks(path)
    if "gesso" not in chunks:
        raise MetadataError(f"image {path} has no 'gesso' metadata chunk (it was not written by gesso)")
    return chunks["gesso"]


_NUMBERED = re.compile(r"^(\d{5,})\.png$")


def next_free_index(folder: Path) -> int:
    """The first index after every ``NNNNN.png`` in the folder, so runs never overwrite each other."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1
