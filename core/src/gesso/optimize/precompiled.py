"""Compiled blocks kept on disk, so that a new process skips Dynamo's tracing.

With a warm Inductor cache, ``torch.compile`` still re-traces every block in every new process:
Dynamo walks the bytecode, AOTAutograd re-traces the graph and the cache key is rebuilt from it
before the kernels are found (3-4 s for SD1.5's 25 block shapes on an H200). ``precompiled``
compiles each block once with ``torch.compile(...).aot_compile``, which returns the compiled
function whole (guards, bytecode, Inductor's output and kernels), writes it to gesso's compile
cache, and has later processes load it in milliseconds per block.

A compiled block is a function of the block (its weights are inputs, not constants), so every
block of one class, structure and shape shares it, and checkpoints of one architecture reuse the
cache. An artifact is keyed by everything the compiled code assumed: the block's class and the
source of the packages that define it, its submodules' settings, its weights' names, shapes,
strides and dtypes, the call's tensor shapes, strides and dtypes and its other arguments, the
compile options, the torch version and the device. Where ``aot_compile`` is unavailable (an older
torch) or refuses a block, the block is compiled just in time as before. A module's first call
compiles its blocks in child processes (:mod:`gesso.optimize.parallel`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gesso.optimize import artifacts, heuristics

logger = logging.getLogger("gesso")

#: Bump when an artifact's meaning or its key changes.
FORMAT = 1
_PRIMITIVES = (bool, int, float, str, type(None))


def cache_dir() -> Path:
    """``GESSO_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/gesso/compiled`` (``~/.cache/gesso/compiled``)."""
    return artifacts.cache_dir("GESSO_COMPILE_CACHE", "compiled")


def enabled() -> bool:
    """Whether compiled blocks are kept: this torch can save a compiled function and load it in
    another process, and ``GESSO_COMPILE_CACHE`` is not ``off``."""
    return hasattr(torch.compiler, "load_compiled_function") and os.environ.get("GESSO_COMPILE_CACHE") != "off"


_package_digests: dict[str, str] = {}


def _package_digest(package: str) -> str:
    """A hash of every Python source file of a top-level package (its code as this process runs it)."""
    if package not in _package_digests:
        digest = hashlib.sha256()
        root = getattr(sys.modules.get(package), "__file__", None)
        if root is not None:
            for path in sorted(Path(root).parent.rglob("*.py")):
                digest.update(str(path.relative_to(Path(root).parent)).encode())
                digest.update(path.read_bytes())
        _package_digests[package] = digest.hexdigest()
    return _package_digests[package]


def _settings(module: torch.nn.Module) -> dict[str, Any]:
    """A module's plain attributes (flags, sizes, scales): what traced code may have specialised on.

    ``None`` is left out: an optional submodule reads as ``None`` whether it was set before or after
    ``Module.__init__`` (a plain attribute, or an empty entry among the submodules)."""
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and value is not None
        and (isinstance(value, _PRIMITIVES) or (isinstance(value, tuple) and all(isinstance(v, _PRIMITIVES) for v in value)))
    }


def artifact_key(block: torch.nn.Module, leaves: list[Any], spec: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Everything a block's compiled code depends on, as JSON."""
    classes = {type(m) for m in block.modules()}
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "device": artifacts.device_signature(tensors[0].device) if tensors else "none",
        "class": f"{type(block).__module__}.{type(block).__qualname__}",
        "sources": {p: _package_digest(p) for p in sorted({c.__module__.split(".")[0] for c in classes})},
        "structure": [[name, type(m).__qualname__, _settings(m)] for name, m in block.named_modules()],
        "weights": [[name, *artifacts.tensor_signature(t)] for name, t in [*block.named_parameters(), *block.named_buffers()]],
        "call": [str(spec), [artifacts.tensor_signature(x) if isinstance(x, torch.Tensor) else repr(x) for x in leaves]],
        "grad": torch.is_grad_enabled(),
        "options": options,
        "heuristics": heuristics.signature(),
    }


class _JustInTime:
    """The fallback: the block's forward compiled by ``torch.compile`` in this process (Dynamo guards it)."""

    def __init__(self, forward: Callable[..., Any], options: dict[str, Any]) -> None:
        self.compiled = torch.compile(forward, fullgraph=True, dynamic=False, **options)
        self.called = False

    def guard_check(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.called:
            return self.compiled(*args, **kwargs)
        with heuristics.active():  # the first call compiles
            result = self.compiled(*args, **kwargs)
        self.called = True
        return result


class PrecompiledForward:
    """A block's forward, run by its compiled artifact: loaded from the cache, else compiled and saved."""

    #: Artifacts loaded or compiled in this process, by key digest (blocks of one shape share one).
    _artifacts: dict[str, Any] = {}

    def __init__(self, block: torch.nn.Module, options: dict[str, Any]) -> None:
        self.block = block
        self.options = options
        self._by_call: dict[Any, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Without its compiled functions: Dynamo pickles the block, this included, into the guards
        of every later compilation, and a compiled function does not pickle."""
        return {"block": self.block, "options": self.options, "_by_call": {}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        call_key = (
            spec,
            torch.is_grad_enabled(),
            *((x.shape, x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in leaves),
        )
        compiled = self._by_call.get(call_key)
        if compiled is None or not compiled.guard_check(self.block, *args, **kwargs):
            # first call with these arguments, or the block's weights changed dtype, device or layout
            compiled = self._prepare(leaves, spec, args, kwargs)
            if compiled is None:  # to be compiled with the others after this call (``parallel``)
                return type(self.block).forward(self.block, *args, **kwargs)
            self._by_call[call_key] = compiled
        return compiled(self.block, *args, **kwargs)

    def _prepare(self, leaves: list[Any], spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The compiled function for this call: in memory, loaded from the cache, or compiled here;
        ``None`` where its compilation waits for the end of a module's first call (``parallel``)."""
        from gesso.optimize import parallel

        forward = type(self.block).forward
        key = artifact_key(self.block, leaves, spec, self.options)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        if digest not in self._artifacts:
            path = cache_dir() / f"{type(self.block).__name__}-{digest}.bin"
            loaded = self._load(path, forward)
            if loaded is None and parallel.defer(self.block, leaves, spec, self.options, path):
                return None
            self._artifacts[digest] = loaded or self._compile(path, forward, args, kwargs)
        compiled = self._artifacts[digest]
        if not compiled.guard_check(self.block, *args, **kwargs):
            # the key missed something the compiled code assumed: compile just in time instead
            logger.warning("compile: %s's cached compilation does not fit this call; compiling it again", type(self.block).__name__)
            compiled = self._artifacts[digest] = _JustInTime(forward, self.options)
        return compiled

    @staticmethod
    def _load(path: Path, forward: Callable[..., Any]) -> Any:
        if not path.exists():
            return None
        import torch._inductor.config

        start = time.perf_counter()
        try:
            # Kernels come compiled in the artifact: no compile workers, whose start and shutdown
            # would add seconds to the process.
            with path.open("rb") as file, torch._inductor.config.patch(compile_threads=1):
                compiled = torch.compiler.load_compiled_function(file, f_globals=forward.__globals__)
        except Exception as err:  # a stale or damaged artifact costs a compile, never the run
            logger.warning("compile: could not load %s (%s: %s); compiling it again", path.name, type(err).__name__, err)
            return None
        compiled.disable_guard_check()  # checked once per call by PrecompiledForward instead
        logger.debug("compile: loaded %s in %.3f s", path.name, time.perf_counter() - start)
        return compiled

    def _compile(self, path: Path, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import torch._dynamo

        start = time.perf_counter()
        if hasattr(torch._dynamo.config, "enable_aot_compile"):
            torch._dynamo.config.enable_aot_compile = True  # off by default in some torch versions
        try:
            with heuristics.active():
                compiled = torch.compile(forward, fullgraph=True, dynamic=False, **self.options).aot_compile(((self.block, *args), kwargs))
        except Exception as err:
            logger.warning(
                "compile: %s cannot be compiled ahead of time (%s: %s); compiling it just in time",
                type(self.block).__name__,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return _JustInTime(forward, self.options)
        compiled.disable_guard_check()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(path))
        except Exception as err:  # the compiled function still runs in this process
            logger.warning("compile: could not save %s (%s: %s)", path.name, type(err).__name__, err)
        logger.info("compile: %s compiled in %.1f s", path.name, time.perf_counter() - start)
        return compiled


def precompile_block(block: torch.nn.Module, options: dict[str, Any]) -> None:
    """Run ``block`` through its cached compilation from now on (compiled on its first call if absent)."""
    if not isinstance(block.__dict__.get("forward"), PrecompiledForward):
        block.forward = PrecompiledForward(block, options)
