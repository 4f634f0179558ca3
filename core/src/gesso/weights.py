"""Finding and reading weight files in the reference on-disk layout.

A component folder holds ``<base>.safetensors`` (or ``<base>.<variant>.safetensors``), or shards
listed by ``<base>.safetensors.index[.<variant>].json``. ``.bin`` files are read only when no
safetensors exist, and only through ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class WeightsError(ValueError):
    """A weight file is missing, unreadable or disagrees with the model; the message names it."""


def with_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (the variant goes before the extension)."""
    if not variant:
        return filename
    stem, _, ext = filename.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def _index_candidates(base: str, ext: str, variant: str | None) -> list[str]:
    if variant:
        # Current layout first, then the older one some published repositories still carry.
        return [f"{base}.{ext}.index.{variant}.json", f"{base}.{ext}.{variant}.index.json"]
    return [f"{base}.{ext}.index.json"]


def find_weight_files(folder: Path, base: str, variant: str | None = None, use_safetensors: bool | None = None) -> list[Path]:
    """The files holding a component's weights, in load order.

    ``use_safetensors=None`` prefers safetensors and falls back to ``.bin``; ``True`` insists on
    safetensors; ``False`` reads ``.bin``. A variant asked for but absent is an error, as it is in
    the reference: silently loading full-precision weights would double the download and memory.
    """
    folder = Path(folder)
    extensions = {None: ["safetensors", "bin"], True: ["safetensors"], False: ["bin", "safetensors"]}[use_safetensors]
    for ext in extensions:
        single = folder / with_variant(f"{base}.{ext}", variant)
        if single.is_file():
            return [single]
        for index_name in _index_candidates(base, ext, variant):
            index = folder / index_name
            if index.is_file():
                return _shards_from_index(index)
    wanted = with_variant(f"{base}.{extensions[0]}", variant)
    present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    hint = f" (the folder holds: {', '.join(present)})" if present else " (the folder is empty or missing)"
    raise WeightsError(f"{folder}: no weights found, expected {wanted} or its sharded index{hint}")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"{index}: not a valid shard index ({err})") from None
    shards = []
    for name in dict.fromkeys(weight_map.values()):  # ordered, de-duplicated
        shard = index.parent / name
        if not shard.is_file():
            raise WeightsError(f"{index}: lists shard {name}, which is missing")
        shards.append(shard)
    return shards


def read_state_dict(
    files: Iterable[Path], device: str | torch.device = "cpu", float_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read and merge the tensors of one or more weight files, onto ``device``, floating-point
    tensors cast to ``float_dtype`` (each as it arrives, so a float32 file loaded as float16 never
    needs room for both copies on the device).

    Safetensors files go to a device other than the CPU straight from the file
    (:func:`load_safetensors_to_device`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    target = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix != ".safetensors":
                part = torch.load(path, map_location=target, weights_only=True)
            elif target.type == "cpu":
                part = load_file(str(path))
            else:
                part = load_safetensors_to_device(path, target, float_dtype)
        except WeightsError:
            raise
        except OSError as err:
            raise WeightsError(f"{path}: cannot read weights ({err.strerror or err})") from None
        except (SafetensorError, RuntimeError, EOFError, ValueError) as err:  # what a damaged file makes the readers say
            if isinstance(err, torch.OutOfMemoryError) or (path.suffix == ".safetensors" and target.type != "cpu"):
                raise  # not the file's fault
            raise WeightsError(f"{path}: cannot read weights ({str(err).splitlines()[0]}); the file may be truncated") from None
        state.update({k: _cast(v, float_dtype) for k, v in part.items()})
    return state


def _cast(tensor: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(float_dtype) if float_dtype is not None and tensor.is_floating_point() else tensor


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 2**20


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset at which its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_bytes <= min(size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(f"{path}: cannot read weights (no valid safetensors header); the file may be truncated")
        try:
            header = json.loads(file.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightsError(f"{path}: cannot read weights (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: cannot read weights (the header is not a JSON object)")
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + header_bytes


def load_safetensors_to_device(path: Path, device: torch.device, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file copied onto ``device`` straight from a read-only mapping
    of the file, page-locked for the copies where the CUDA runtime allows (see
    :mod:`gesso.device_transfer`): one DMA per tensor instead of staged pageable copies."""
    from gesso.device_transfer import read_only_file_view

    header, data_start = _read_header(path)
    state = {}
    with read_only_file_view(path, device) as raw:
        for name, entry in header.items():
            tensor = _tensor_view(raw, data_start, name, entry, path)
            dtype = float_dtype if float_dtype is not None and tensor.is_floating_point() else tensor.dtype
            state[name] = tensor.to(device, dtype, non_blocking=device.type == "cuda", copy=True)
    return state


def _tensor_view(raw: torch.Tensor, data_start: int, name: str, entry: dict[str, Any], path: Path) -> torch.Tensor:
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(n) for n in entry["shape"]]
        begin, end = (data_start + int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: tensor {name!r} has an unreadable header entry {entry!r}") from None
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if end > raw.numel() or not data_start <= begin <= end:
        raise WeightsError(f"{path}: tensor {name!r} runs past the end of the file; the file may be truncated")
    if end - begin != math.prod(shape) * itemsize:
        raise WeightsError(f"{path}: tensor {name!r} holds {end - begin} bytes, but its shape {shape} needs {math.prod(shape) * itemsize}")
    data = raw[begin:end]
    if begin % itemsize:  # a view must start at a multiple of the element size
        data = data.clone()
    return data.view(dtype).view(shape)


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys or shapes disagree with the module built from the config."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: tensor {missing[0]!r} is missing{more}")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]!r}{more} (does config.json match the weights?)")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, but the config gives {tuple(tensor.shape)}")


def save_state_dict(
    state: dict[str, torch.Tensor], folder: Path, base: str, variant: str | None = None, max_shard_bytes: int = 10 * 2**30
) -> list[Path]:
    """Write safetensors, sharded with an index when larger than ``max_shard_bytes``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    single = with_variant(f"{base}.safetensors", variant)
    if len(shards) == 1:
        save_file(shards[0], str(folder / single), metadata={"format": "pt"})
        return [folder / single]
    written, weight_map = [], {}
    stem = single[: -len(".safetensors")]
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        written.append(folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = folder / _index_candidates(base, "safetensors", variant)[0]
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return written
