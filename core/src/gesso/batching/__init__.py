"""Batch generation: one image per prompt of a list, resumable, in this process or on a Ray cluster.

``gesso batch --model M --prompts FILE --out DIR [--engine local|ray] [--workers N] [KEY=VALUE ...]``
and ``gesso.batch(prompts, out, ...)`` do the same:

- FILE holds one prompt per line, or JSON Lines (``{"prompt": ..., <any run-config key>: ...}``);
  item ``i`` (the i-th non-blank line) becomes ``DIR/{i:05d}.png`` made with seed ``seed + i``
  (``seed`` from the config, or chosen once and kept in ``DIR/job.json``), one image per item,
  ``torch.Generator("cpu").manual_seed(seed + i)``: the pixels of ``gesso run`` with that seed,
  whatever the engine, the number of workers or the order in which items finish;
- images are written atomically with the ``parameters`` and ``gesso`` chunks (``gesso run --from
  DIR/00003.png`` replays item 3); ``manifest.jsonl`` gets a record per finished image only after
  its rename, ``errors.jsonl`` one per failed item of the latest run (see :mod:`gesso.batching.manifest`);
- a rerun of the same command resumes: images with a record and a matching sha256 are skipped,
  failed and missing ones are made again; exit status 0 when every item has its image, 1 when some
  failed, 2 for a usage error;
- ``batch_size`` (``batch_size=N`` or ``--batch-size N``) is a job-level key: how many items go to a
  worker at a time. It is not part of any image's config and never changes pixels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_batch_parser", "batch", "run_batch_command"]


def batch(
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
) -> Any:
    """Run (or resume) a batch job; returns a :class:`gesso.batching.job.BatchResult`.

    ``prompts`` is a prompts file, or a list of prompts / mappings with ``prompt`` and overrides.
    ``config`` (a YAML file or a mapping) and ``overrides`` (``key=value``) form the job's base
    config, as for ``gesso.run``. ``progress=None`` shows a bar only when stderr is a terminal.
    """
    from gesso.batching.job import run_job

    return run_job(
        prompts,
        out,
        model=model,
        config=config,
        overrides=overrides,
        engine=engine,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
        host=host,
    )


def add_batch_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("batch", help="one image per prompt of a file, resumable, locally or on Ray")
    parser.add_argument("--model", help="Hub repository id or local folder")
    parser.add_argument(
        "--prompts", required=True, metavar="FILE", help="one prompt per line, or JSON Lines with 'prompt' and per-item overrides"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (images, manifest.jsonl, errors.jsonl)")
    parser.add_argument("--config", metavar="YAML", help="the job's base run config")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this process; ray: one Ray worker per GPU")
    parser.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per GPU of the cluster, or 1)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="items sent to a worker at a time (default 4)")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: only on a terminal)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides for every item, and batch_size=N")
    return parser


def run_batch_command(args: argparse.Namespace) -> int:
    result = batch(
        args.prompts,
        args.out,
        model=args.model,
        config=args.config,
        overrides=args.overrides,
        engine=args.engine,
        workers=args.workers,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    print(result.summary(), file=sys.stderr)
    return result.exit_code
