"""The on-disk state of a batch job: prompts file, ``job.json``, ``manifest.jsonl``, ``errors.jsonl``.

Files in the output folder ``DIR``:

- ``NNNNN.png``: item ``N``'s image, written through a temporary file, fsync and a rename;
- ``manifest.jsonl``: one JSON line per finished image, appended (flush + fsync) only after the
  image's rename: ``{"index", "file", "prompt", "seed", "overrides", "sha256"}`` (plus
  ``"nsfw": true`` when the safety checker blacked the image out);
- ``errors.jsonl``: one JSON line per item that failed in the latest run of the job
  (``{"index", "prompt", "seed", "overrides", "error"}``); failed items are retried by a rerun;
- ``job.json``: the job's base seed and a fingerprint of its config, so a rerun resumes the same job;
- ``.lock``: held (``flock``) while a job runs, so two jobs never write one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gesso.config import ConfigError
from gesso.output import write_atomic

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
JOB = "job.json"
LOCK = ".lock"

_IMAGE = re.compile(r"^(\d{5,})\.png$")
_TEMPORARY = re.compile(r"^\.(\d{5,}|manifest\.jsonl|errors\.jsonl|job\.json)\..*\.tmp$")


class BatchError(ConfigError):
    """A batch job cannot start (bad prompts file, a folder holding another job, ...): exit status 2."""


@dataclass
class Item:
    """One line of the prompts file: the prompt and its run-config overrides (or why it is unusable)."""

    index: int
    prompt: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def read_items(source: str | Path | Sequence[str | Mapping[str, Any]]) -> list[Item]:
    """Items from a prompts file (one prompt per line, or JSON Lines) or a list of prompts / mappings.

    A file whose name ends in ``.jsonl`` or whose first non-blank line starts with ``{`` is JSON
    Lines: each line an object with ``prompt`` and any run-config keys. Blank lines are skipped;
    items are numbered from 0 in file order. A malformed line becomes an item with an error.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise BatchError(f"prompts file {path} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        jsonl = path.suffix == ".jsonl" or (bool(lines) and lines[0].lstrip().startswith("{"))
        entries: list[Any] = [_parse_json_line(line) for line in lines] if jsonl else [line.strip() for line in lines]
    else:
        entries = list(source)
    items = [_item(index, entry) for index, entry in enumerate(entries)]
    if not items:
        raise BatchError("the prompts file holds no prompts")
    return items


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return BatchError(f"not valid JSON ({err.msg} at column {err.colno})")


def _item(index: int, entry: Any) -> Item:
    if isinstance(entry, Exception):
        return Item(index, None, error=f"{type(entry).__name__}: {entry}")
    if isinstance(entry, str):
        return Item(index, entry)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("prompt"), str):
        return Item(index, None, error="ConfigError: a JSON line must be an object with a string 'prompt'")
    overrides = json.loads(json.dumps({k: v for k, v in entry.items() if k != "prompt"}, default=str))  # as the manifest stores them
    return Item(index, entry["prompt"], overrides)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def append_line(stream: IO[str], record: Mapping[str, Any]) -> None:
    stream.write(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
    stream.flush()
    os.fsync(stream.fileno())


class JobFolder:
    """The output folder of one job, locked while the job runs."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock: IO[str] | None = None

    def __enter__(self) -> JobFolder:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / LOCK, "w")  # noqa: SIM115 - held for the job's lifetime
        try:
            import fcntl

            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no flock on this platform
            pass
        except OSError:
            self._lock.close()
            raise BatchError(f"{self.folder} is in use by another gesso batch job") from None
        for path in self.folder.iterdir():  # leftovers of a killed run: never a finished file
            if _TEMPORARY.match(path.name):
                path.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()

    def images(self) -> dict[int, Path]:
        return {int(m.group(1)): p for p in self.folder.iterdir() if (m := _IMAGE.match(p.name))}

    def check_job(self, fingerprint: str, seed: int | None) -> int | None:
        """The seed recorded for this folder's job (None for a new job); refuse a different job."""
        path = self.folder / JOB
        if not path.is_file():
            if self.images():
                raise BatchError(f"{self.folder} holds images that no gesso batch job recorded; choose another --out")
            return None
        try:
            job = json.loads(path.read_text(encoding="utf-8"))
            recorded_seed, recorded_fingerprint = int(job["seed"]), str(job["config_sha256"])
        except (ValueError, KeyError, TypeError):
            raise BatchError(f"{path} is unreadable; remove it (and the images) or choose another --out") from None
        if recorded_fingerprint != fingerprint:
            raise BatchError(
                f"{self.folder} holds a job with a different config; rerun it with its original options or choose another --out"
            )
        if seed is not None and seed != recorded_seed:
            raise BatchError(f"{self.folder} holds a job with seed={recorded_seed}, not seed={seed}; choose another --out")
        return recorded_seed

    def write_job(self, fingerprint: str, seed: int, model: str) -> None:
        data = json.dumps({"version": 1, "seed": seed, "model": model, "config_sha256": fingerprint}, indent=2) + "\n"
        write_atomic(data.encode(), self.folder / JOB)

    def load_manifest(self) -> dict[int, dict[str, Any]]:
        """The finished images: one verified record per index (the file exists and its sha256 matches).

        A torn last line (a kill during an append), duplicate records and records whose file is
        missing or changed are dropped, and the manifest is rewritten without them.
        """
        path = self.folder / MANIFEST
        if not path.is_file():
            return {}
        raw = path.read_bytes()
        dirty = bool(raw) and not raw.endswith(b"\n")
        records: dict[int, dict[str, Any]] = {}
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                index = int(record["index"])
                file = self.folder / str(record["file"])
                valid = index not in records and file.name == image_name(index) and file.is_file() and sha256_file(file) == record["sha256"]
            except (ValueError, KeyError, TypeError):
                valid = False
            if valid:
                records[index] = record
            else:
                dirty = True
        if dirty:
            self.rewrite(MANIFEST, records.values())
        return records

    def rewrite(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        write_atomic(text.encode("utf-8"), self.folder / name)
