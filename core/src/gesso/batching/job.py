"""One batch job: resolve every item's config, skip what is finished, render the rest, record it."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gesso.batching import manifest as state
from gesso.batching.engines import ENGINES, Outcome, import_ray, one_line
from gesso.batching.manifest import ERRORS, MANIFEST, BatchError, Item, JobFolder, append_line, image_name, read_items
from gesso.config import ConfigError, parse_overrides, to_yaml, validate

#: Job-level keys accepted among the KEY=VALUE overrides; they are not part of any image's config.
JOB_KEYS = ("batch_size",)
DEFAULT_BATCH_SIZE = 4


@dataclass
class BatchResult:
    folder: Path
    seed: int
    total: int
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every item has its image, 1 when some failed."""
        return 1 if self.failed else 0

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    @property
    def errors(self) -> Path:
        return self.folder / ERRORS

    def summary(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"gesso batch: {len(self.written)} written, {len(self.skipped)} already done, {len(self.failed)} failed "
            f"of {self.total} in {self.seconds:.1f} s ({rate:.2f} images/s); seed={self.seed}; manifest: {self.manifest}"
        )
        return text + (f"; errors: {self.errors}" if self.failed else "")


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _split_job_keys(overrides: Sequence[str], batch_size: int | None) -> tuple[list[str], int]:
    run_overrides = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "batch_size":
            try:
                batch_size = int(value)
            except ValueError:
                raise BatchError(f"batch_size: must be a positive integer, got {value!r}") from None
        else:
            run_overrides.append(override)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size <= 0:
        raise BatchError(f"batch_size: must be a positive integer, got {batch_size}")
    return run_overrides, batch_size


def _fingerprint(base: DictConfig) -> str:
    """The job's identity: its base config without the seed, the prompt and the output folder."""
    container = OmegaConf.to_container(base, resolve=True)
    for key in ("seed", "prompt", "output"):
        container.pop(key, None)  # type: ignore[union-attr]
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()


def item_seed(item: Item, seed: int) -> Any:
    return item.overrides.get("seed", seed + item.index)


class _Resolver:
    """Each item's resolved config: the job's base config, the item's overrides, its prompt and seed."""

    def __init__(self, base: DictConfig, host: Any) -> None:
        from gesso.plugins import get_host

        self.base = base
        self.host = host or get_host()
        self.container = OmegaConf.to_container(base, resolve=True)

    def __call__(self, item: Item, seed: int) -> DictConfig:
        from gesso.runner import resolve_config

        if item.error:
            raise ConfigError(item.error)
        overrides = item.overrides
        for key in JOB_KEYS:
            if key in overrides:
                raise ConfigError(f"{key}: a job-level key; give it to the whole job, not to one item")
        if "output" in overrides:
            raise ConfigError("output: the batch job sets the output folder (--out), not an item")
        if overrides.get("num_images_per_prompt", 1) != 1:
            raise ConfigError("num_images_per_prompt: a batch item makes one image; repeat the line (each gets its own seed)")
        layer = {**overrides, "prompt": item.prompt, "seed": item_seed(item, seed)}
        if not item.overrides:  # the common case, without a full merge per item
            config = self.base.copy()
            config.prompt, config.seed = layer["prompt"], layer["seed"]
            validate(config, self.host.registry)
            return config
        base = dict(self.container)  # type: ignore[arg-type]
        if ("model" in overrides or "variant" in overrides) and "family" not in overrides:
            base.pop("family", None)  # detected again for the item's model
        merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(layer)))
        return resolve_config(merged, host=self.host)  # type: ignore[arg-type]


def run_job(
    prompts: str | Path | Sequence[str | Mapping[str, Any]],
    out: str | Path,
    *,
    model: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    engine: str = "local",
    workers: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    host: Any = None,
) -> BatchResult:
    from gesso.plugins import get_host
    from gesso.runner import resolve_config

    overrides, batch_size = _split_job_keys(overrides, batch_size)
    if engine not in ENGINES:
        raise BatchError(f"engine: must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers is not None and workers <= 0:
        raise BatchError(f"--workers must be positive, got {workers}")
    if engine == "local" and workers not in (None, 1):
        raise BatchError("--workers is for --engine ray; the local engine runs one worker in this process")
    if engine == "ray":
        import_ray()  # fail before any work when Ray is missing
    items = read_items(prompts)
    host = host or get_host()
    folder = Path(out)
    layers = ([f"model={_quote(model)}"] if model else []) + list(overrides) + [f"output.dir={_quote(str(folder))}"]
    parse_overrides(layers)  # a malformed KEY=VALUE is refused by name
    base = resolve_config(config, layers, host=host)
    if base.num_images_per_prompt != 1:
        raise BatchError("num_images_per_prompt: a batch job makes one image per item; repeat the line instead")
    fingerprint = _fingerprint(base)
    resolver = _Resolver(base, host)

    started = time.monotonic()
    with JobFolder(folder) as job:
        recorded = job.check_job(fingerprint, base.seed)
        seed = int(base.seed) if base.seed is not None else recorded if recorded is not None else random.SystemRandom().randrange(2**32)
        if recorded is None:
            job.write_job(fingerprint, seed, str(base.model))
        result = BatchResult(folder=folder, seed=seed, total=len(items))
        records = job.load_manifest()
        files = job.images()
        job.rewrite(ERRORS, [])  # errors.jsonl: the failures of this run only
        with open(folder / MANIFEST, "a", encoding="utf-8") as manifest, open(folder / ERRORS, "a", encoding="utf-8") as errors:

            def fail(item: Item, message: str) -> None:
                append_line(
                    errors,
                    {
                        "index": item.index,
                        "prompt": item.prompt,
                        "seed": item_seed(item, seed),
                        "overrides": item.overrides,
                        "error": message,
                    },
                )
                result.failed.append(item.index)

            def record(item: Item, path: Path, sha256: str, nsfw: bool = False) -> None:
                entry = {
                    "index": item.index,
                    "file": path.name,
                    "prompt": item.prompt,
                    "seed": item_seed(item, seed),
                    "overrides": item.overrides,
                    "sha256": sha256,
                }
                if nsfw:
                    entry["nsfw"] = True
                append_line(manifest, entry)

            tasks: list[tuple[int, dict[str, Any]]] = []
            for item in items:
                done = records.get(item.index)
                if done is not None:
                    if (done.get("prompt"), done.get("seed"), done.get("overrides")) != (
                        item.prompt,
                        item_seed(item, seed),
                        item.overrides,
                    ):
                        raise BatchError(
                            f"item {item.index} differs from the finished {done['file']} in {folder}; rerun the original prompts file or choose another --out"
                        )
                    result.skipped.append(item.index)
                    continue
                try:
                    resolved = resolver(item, seed)
                except Exception as err:  # a bad override (or an item's unknown model): recorded, the job goes on
                    fail(item, item.error or one_line(err))
                    continue
                path = folder / image_name(item.index)
                if item.index in files and _adoptable(path, resolved):  # renamed, but killed before its record
                    record(item, path, state.sha256_file(path))
                    result.skipped.append(item.index)
                    continue
                tasks.append((item.index, OmegaConf.to_container(resolved, resolve=True)))  # type: ignore[arg-type]

            bar = _progress_bar(len(tasks), progress)
            try:
                for outcome in ENGINES[engine](tasks, batch_size=batch_size, workers=workers, host=host):
                    _finish(outcome, items[outcome.index], folder, record, fail, result)
                    bar.update(1)
            finally:
                bar.close()
    result.seconds = time.monotonic() - started
    return result


def _finish(outcome: Outcome, item: Item, folder: Path, record: Any, fail: Any, result: BatchResult) -> None:
    if outcome.error is not None or outcome.png is None:
        fail(item, outcome.error or "no image")
        return
    path = folder / image_name(item.index)
    state.write_atomic(outcome.png, path)
    record(item, path, hashlib.sha256(outcome.png).hexdigest(), outcome.nsfw)
    result.written.append(item.index)


def _adoptable(path: Path, resolved: DictConfig) -> bool:
    """An image renamed into place whose record was lost (a kill in between) is kept if it is this item's."""
    from gesso.output import MetadataError, read_run_config

    try:
        return read_run_config(path) == to_yaml(resolved)
    except MetadataError:
        return False


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool | None) -> Any:
    show = sys.stderr.isatty() if progress is None else progress
    if not show or total == 0:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
        return _NoBar()
    return tqdm(total=total, desc="gesso batch", unit="img", file=sys.stderr, dynamic_ncols=True)
