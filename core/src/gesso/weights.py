"""Finding and reading weight files in the reference on-disk layout.

A component folder holds ``<base>.safetensors`` (or ``<base>.<variant>.safetensors``), or shards
listed by ``<base>.safetensors.index[.<variant>].json``. ``.bin`` files are read only when no
safetensors exist, and only through ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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


def read_state_dict(files: Iterable[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read and merge the tensors of one or more weight files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                part = load_file(str(path), device=str(device))
            else:
                part = torch.load(path, map_location=device, weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError) as err:
            raise WeightsError(f"{path}: cannot read weights ({str(err).splitlines()[0]}); the file may be truncated") from None
        state.update(part)
    return state


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
