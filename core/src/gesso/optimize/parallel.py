"""A module's first compile, its blocks compiled side by side in child processes.

Compiling a block is mostly serial Python (Dynamo, AOTAutograd, Inductor's lowering): during
SD1.5's first compile on the H200 machine the process was busy for 61 of its 71 s, and Inductor's
own compile workers (Triton builds) cut only 99 s to those 71. So a hot-loop module's first call runs the blocks that have no
compilation in the cache yet eagerly, noting each one's call; those blocks are then compiled in up
to ``GESSO_COMPILE_WORKERS`` child processes at once (default: half the CPU cores, at most 8), which
write them to the compile cache; and the call runs again through the compiled blocks, so that its
result is the compiled one, as in every later call. A block whose child fails is compiled in this
process on its next call, as with one worker.

A child receives each block with the shapes, strides and dtypes of its weights and inputs but not
their values (compiling reads no values), so it holds one block's memory at a time, never the
model's.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger("gesso")

MAX_WORKERS = 8


@dataclass
class Job:
    """One block's compilation: the block, one call's arguments, the options and where it goes."""

    block: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    path: Path
    grad: bool


#: The jobs noted during a module's first call, while one is running.
_pending: list[Job] | None = None


def workers() -> int:
    """``GESSO_COMPILE_WORKERS``, else half the CPU cores, at most 8 (1 compiles in this process)."""
    return _workers(os.environ.get("GESSO_COMPILE_WORKERS", ""))


@functools.lru_cache
def _workers(value: str) -> int:
    if value.strip().isdigit():
        return int(value)
    if value:  # said once per value
        logger.warning("GESSO_COMPILE_WORKERS must be a whole number, not %r; using the default", value)
    return min(MAX_WORKERS, max(1, (os.cpu_count() or 1) // 2))


def defer(block: torch.nn.Module, leaves: list[Any], spec: Any, options: dict[str, Any], path: Path) -> bool:
    """Note ``block``'s compilation for after the current first call; False where none is collecting."""
    if _pending is None or workers() < 2:
        return False
    if all(job.path != path for job in _pending):
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        _pending.append(Job(block, args, kwargs, options, path, torch.is_grad_enabled()))
    return True


class CompileBlocksTogether:
    """Wraps a module's ``forward``: a call that meets blocks not yet compiled compiles them together."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        global _pending
        if _pending is not None:  # inside another module's first call: its batch takes these blocks
            return self.forward(*args, **kwargs)
        _pending = []
        try:
            output = self.forward(*args, **kwargs)
            jobs = _pending
        finally:
            _pending = None
        if not jobs:
            return output
        if len(jobs) > 1:  # one block alone compiles faster here than in a new process
            compile_jobs(jobs)
        return self.forward(*args, **kwargs)


def compile_together(module: torch.nn.Module) -> None:
    """Have ``module``'s calls compile its blocks together (once per new set of block shapes)."""
    if not isinstance(module.__dict__.get("forward"), CompileBlocksTogether):
        module.forward = CompileBlocksTogether(module.forward)


class _WithoutValues(pickle.Pickler):
    """Pickles tensors as their shape, strides, dtype, device and ``requires_grad`` only (what the
    compiled code's guards check)."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return (tuple(obj.shape), obj.stride(), obj.dtype, str(obj.device), isinstance(obj, torch.nn.Parameter), obj.requires_grad)
        return None


class _WithNewValues(pickle.Unpickler):
    """Makes each pickled tensor anew, as it was but for its values (random)."""

    def persistent_load(self, pid: Any) -> torch.Tensor:
        shape, stride, dtype, device, is_parameter, requires_grad = pid
        extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
        memory = torch.empty(extent, dtype=dtype, device=device)
        if memory.is_floating_point():
            memory.normal_()
        else:
            memory.zero_()
        tensor = memory.as_strided(shape, stride)
        return torch.nn.Parameter(tensor, requires_grad) if is_parameter else tensor.requires_grad_(requires_grad)


def compile_jobs(jobs: list[Job]) -> None:
    """Compile ``jobs`` in child processes, each with a share of them and of the CPU cores."""
    count = min(workers(), len(jobs))
    threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS") or str(max(1, (os.cpu_count() or 1) // count))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gesso-compile-") as work:
        children = []
        for index in range(count):
            jobs_file, log_file = Path(work) / f"jobs-{index}.pickle", Path(work) / f"log-{index}.txt"
            with jobs_file.open("wb") as file:
                _WithoutValues(file).dump(jobs[index::count])
            with log_file.open("w") as log:
                command = [sys.executable, "-m", "gesso.optimize.parallel", str(jobs_file)]
                env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": threads}
                children.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log_file))
        for child, log_file in children:
            if child.wait() != 0:
                lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
                reason = lines[-1] if lines else f"exit status {child.returncode}"
                logger.warning("compile: a compile worker failed (%s); its blocks compile in this process", reason)
    logger.info("compile: %d blocks compiled in %d processes in %.1f s", len(jobs), count, time.perf_counter() - start)


def _work(jobs_file: str) -> None:
    """A child process: compile each job's block and write it to the compile cache."""
    from gesso.optimize.precompiled import PrecompiledForward

    with open(jobs_file, "rb") as file:
        jobs: list[Job] = _WithNewValues(file).load()
    for job in jobs:
        with torch.set_grad_enabled(job.grad):
            PrecompiledForward(job.block, job.options)._compile(job.path, type(job.block).forward, job.args, job.kwargs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _work(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the artifacts are written; skip tearing down Inductor's compile workers (seconds)
