"""Turning a model reference (a local folder or a Hub repository id) into a local folder.

For a Hub id only the files a pipeline needs are fetched: each component's configs, tokenizer
files and one set of weights (the asked-for variant where the component has it, safetensors over
``.bin``). ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` reads the local cache and nothing else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Repositories that moved on the Hub; the old id still resolves (to the cache entry of either).
MOVED_REPOSITORIES = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}

_WEIGHT_EXTENSIONS = (".safetensors", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(ValueError):
    """A model reference names no local folder and no reachable (or cached) Hub repository."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_hub_id(reference: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(reference)) and not Path(reference).exists()


def read_model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder}: no model_index.json, so this is not a pipeline folder") from None
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ModelNotFoundError(f"{path}: has no _class_name")
    return data


def component_names(model_index: dict[str, Any]) -> list[str]:
    """Components are the entries whose value is a ``[library, ClassName]`` pair."""
    return [k for k, v in model_index.items() if not k.startswith("_") and isinstance(v, list | tuple) and len(v) == 2]


def select_files(files: Iterable[str], folders: Iterable[str] | None, variant: str | None, use_safetensors: bool | None) -> list[str]:
    """Pick, from a repository listing, what loading needs; pure, so its rules are testable.

    Per folder: every non-weight file (configs, tokenizer vocabularies), then one weight set:
    the variant's safetensors, else plain safetensors, else (unless ``use_safetensors``) ``.bin``.
    """
    files = list(files)
    wanted_folders = None if folders is None else set(folders)
    by_folder: dict[str, list[str]] = {}
    for name in files:
        folder = name.rsplit("/", 1)[0] if "/" in name else ""
        if wanted_folders is None or folder in wanted_folders or folder == "":
            by_folder.setdefault(folder, []).append(name)
    chosen: list[str] = []
    for folder, names in by_folder.items():
        weights = [n for n in names if n.endswith(_WEIGHT_EXTENSIONS) or ".index." in n.rsplit("/", 1)[-1] and n.endswith(".json")]
        chosen += [n for n in names if n not in weights and not n.endswith((".ckpt", ".msgpack", ".h5", ".onnx", ".pb"))]
        if folder == "" and wanted_folders is not None:
            continue  # a pipeline repository's top-level weights belong to no component
        chosen += _pick_weight_set(weights, variant, use_safetensors)
    return sorted(set(chosen))


def _pick_weight_set(weights: list[str], variant: str | None, use_safetensors: bool | None) -> list[str]:
    def is_variant(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return bool(variant) and (f".{variant}." in base or f".{variant}-" in base)

    def plain(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return not re.search(r"\.(fp16|bf16|fp32|non_ema|ema)[.-]", base)

    for ext in (".safetensors", ".bin"):
        if ext == ".bin" and use_safetensors:
            break
        kind = [n for n in weights if n.endswith(ext) or ext.lstrip(".") in n and n.endswith(".json")]
        if variant and any(is_variant(n) for n in kind):
            return [n for n in kind if is_variant(n)]
        if any(plain(n) for n in kind):
            return [n for n in kind if plain(n)]
    return []


def resolve(
    reference: str | os.PathLike[str],
    *,
    folders: Iterable[str] | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local folder for ``reference``: the folder itself, or the Hub snapshot of only what is needed.

    ``folders=None`` takes the whole repository (filtered by weight rules); otherwise the listed
    sub-folders. For a pipeline repository pass ``folders=pipeline_folders(...)``.
    """
    text = os.fspath(reference)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model {text!r} is a file, not a folder in the reference layout")
        return path
    if not is_hub_id(text):
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    local_only = local_files_only or offline()
    candidates = [text] + ([MOVED_REPOSITORIES[text]] if text in MOVED_REPOSITORIES else [])
    errors = []
    for repo in candidates:
        try:
            return _snapshot(repo, folders, variant, use_safetensors, revision, cache_dir, local_only, token)
        except _hub_errors() as err:
            errors.append((repo, err))
    why = (
        "it is not in the local cache and the Hub is not used (HF_HUB_OFFLINE or local_files_only)"
        if local_only
        else f"{type(errors[-1][1]).__name__}: {str(errors[-1][1]).splitlines()[0] if str(errors[-1][1]) else ''}"
    )
    raise ModelNotFoundError(f"model {text!r} cannot be loaded: {why}")


def pipeline_folders(reference: str, **options: Any) -> list[str]:
    """The component folders a pipeline repository's ``model_index.json`` names."""
    index_folder = resolve(reference, folders=[], **options)
    return component_names(read_model_index(index_folder))


def resolve_pipeline(reference: str | os.PathLike[str], **options: Any) -> Path:
    """A local pipeline folder: for a Hub id, ``model_index.json`` first, then its components."""
    text = os.fspath(reference)
    if Path(text).expanduser().exists() or not is_hub_id(text):
        return resolve(text, **options)
    hub_options = {k: v for k, v in options.items() if k not in ("variant", "use_safetensors")}
    folders = component_names(read_model_index(resolve(text, folders=[], **hub_options)))
    return resolve(text, folders=folders, **options)


def resolve_component_folder(reference: str | os.PathLike[str], subfolder: str | None = None, **options: Any) -> Path:
    """The local folder of one component (``subfolder`` of a pipeline, or a model repository)."""
    base = resolve(reference, folders=None if subfolder is None else [subfolder], **options)
    folder = base / subfolder if subfolder else base
    if not folder.is_dir():
        raise ModelNotFoundError(f"{base}: has no sub-folder {subfolder!r}")
    return folder


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.LocalEntryNotFoundError,
        errors.EntryNotFoundError,
        errors.HfHubHTTPError,
        errors.OfflineModeIsEnabled,
        OSError,
    )


def _snapshot(
    repo: str,
    folders: Iterable[str] | None,
    variant: str | None,
    use_safetensors: bool | None,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_only: bool,
    token: str | bool | None,
) -> Path:
    import huggingface_hub

    folders = None if folders is None else list(folders)
    if local_only:
        snapshot = Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
        listing = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        needed = select_files(listing, folders, variant, use_safetensors)
        if folders and not needed:
            raise ModelNotFoundError(f"model {repo!r}: the cached snapshot {snapshot.name} lacks {folders}")
        return snapshot
    listing = huggingface_hub.list_repo_files(repo, revision=revision, token=token)
    patterns = select_files(listing, folders, variant, use_safetensors)
    return Path(
        huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=patterns or ["model_index.json"]
        )
    )
