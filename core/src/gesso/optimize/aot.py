"""Ahead-of-time compilation: the hot loop kept on disk as AOTInductor packages.

``compile`` (``torch.compile``) runs Dynamo in every new process, even when Inductor's cache holds
every kernel: importing the compiler and tracing cost seconds before the first step.
``compile_aot`` compiles each hot-loop module once into an AOTInductor package (the generated
kernels plus a small native wrapper that launches them) and, in later processes, loads the package
without importing the compiler at all.

A package is compiled with the module's weights as *inputs*, not constants: a package holds no
checkpoint values (any checkpoint of the same architecture reuses it) and the weights stay the
module's own tensors, so ``.to()``, offload and re-loading keep working. A package is keyed by the
module's class, its weights' names, shapes and dtypes, the inputs' shapes, strides and dtypes, its
non-tensor arguments, the torch version and the GPU architecture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gesso.optimize import artifacts

logger = logging.getLogger("gesso")

#: Bump when the package contents or the key change meaning.
FORMAT = 1
OUTPUT_CLASS = "gesso_output_class"
_OUTPUT_CLASSES: dict[int, str] = {}


def cache_dir() -> Path:
    """``GESSO_AOT_CACHE``, else ``$XDG_CACHE_HOME/gesso/aot`` (``~/.cache/gesso/aot``)."""
    return artifacts.cache_dir("GESSO_AOT_CACHE", "aot")


def _weights(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _as_tree(output: Any) -> Any:
    """Dataclass outputs (``UNet2DConditionOutput``) as a dict of their fields, which export can return."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
    return output


class _WeightsAsInputs(torch.nn.Module):
    """The module as a pure function of (weights..., tensor arguments...) for ``torch.export``.

    The module is held outside the module tree, so export sees no parameters of its own and every
    weight becomes an input of the graph. A dataclass output's type is noted in ``_OUTPUT_CLASSES``
    (export restores any attribute that a traced forward sets on its module).
    """

    def __init__(self, module: torch.nn.Module, names: list[str], leaves: list[Any], spec: Any) -> None:
        super().__init__()
        object.__setattr__(self, "module", module)
        self.names, self.leaves, self.spec = names, leaves, spec

    def forward(self, *flat: torch.Tensor) -> Any:
        weights = dict(zip(self.names, flat[: len(self.names)]))
        tensors = iter(flat[len(self.names) :])
        leaves = [next(tensors) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        output = torch.func.functional_call(self.module, weights, args, kwargs)
        if dataclasses.is_dataclass(output):
            _OUTPUT_CLASSES[id(self)] = f"{type(output).__module__}:{type(output).__qualname__}"
        return _as_tree(output)


class AotForward:
    """A module's forward, run from its AOTInductor package (compiled on first use, else loaded)."""

    _loaded: dict[str, Any] = {}  # package path -> (loader, output spec, output class), shared process-wide

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._by_call: dict[Any, tuple[Any, Any, Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        call_key = (spec, *((x.shape, x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in leaves))
        entry = self._by_call.get(call_key)
        if entry is None:
            entry = self._by_call[call_key] = self._prepare(leaves, spec, tensors)
        loader, out_spec, output_class = entry
        weights = [t for _, t in _weights(self.module)]
        output = pytree.tree_unflatten(loader.run([*weights, *tensors]), out_spec)
        return output_class(**output) if output_class is not None else output

    def _prepare(self, leaves: list[Any], spec: Any, tensors: list[torch.Tensor]) -> tuple[Any, Any, Any]:
        weights = _weights(self.module)
        device = tensors[0].device
        key = {
            "format": FORMAT,
            "torch": torch.__version__,
            "device": artifacts.device_signature(device),
            "module": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "weights": [[name, *artifacts.tensor_signature(t)] for name, t in weights],
            "inputs": [artifacts.tensor_signature(t) for t in tensors],
            "call": [str(spec), [None if isinstance(x, torch.Tensor) else repr(x) for x in leaves]],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = cache_dir() / f"{type(self.module).__name__}-{digest}.pt2"
        if not path.exists():
            _compile_package(self.module, [n for n, _ in weights], leaves, spec, [*[t for _, t in weights], *tensors], path)
        if str(path) not in self._loaded:
            self._loaded[str(path)] = _load_package(path, device)
        return self._loaded[str(path)]


def _load_package(path: Path, device: torch.device) -> tuple[Any, Any, Any]:
    start = time.perf_counter()
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else -1)
    # single-threaded: no completion event is queried per run, which a CUDA-graph capture forbids
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, index)
    out_spec = pytree.treespec_loads(loader.get_call_spec()[1])
    output_class = loader.get_metadata().get(OUTPUT_CLASS) or None
    if output_class:
        module_name, _, name = output_class.partition(":")
        output_class = getattr(importlib.import_module(module_name), name)
    logger.info("loaded %s in %.2f s", path.name, time.perf_counter() - start)
    return loader, out_spec, output_class


def _compile_package(module: torch.nn.Module, names: list[str], leaves: list[Any], spec: Any, flat: list[torch.Tensor], path: Path) -> None:
    """Export the module with its weights as inputs, then compile it into a package at ``path`` in a
    child process: Inductor's code generation and the C++ compiler run there, and their memory and
    state leave with it. The package appears whole or not at all."""
    import subprocess
    import sys

    start = time.perf_counter()
    pure = _WeightsAsInputs(module, names, leaves, spec)
    wrapped_forward = module.__dict__.pop("forward", None)  # trace the module's own forward
    try:
        with torch.no_grad():
            exported = torch.export.export(pure, tuple(flat), strict=False)
    finally:
        if wrapped_forward is not None:
            module.forward = wrapped_forward
    exported_s = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".partial-") as work:
        program, package = Path(work) / "program.pt2", Path(work) / "package.pt2"
        torch.export.save(exported, program)
        metadata = json.dumps({OUTPUT_CLASS: _OUTPUT_CLASSES.pop(id(pure), "")})
        done = subprocess.run(
            [sys.executable, "-m", "gesso.optimize.aot", str(program), str(package), metadata], capture_output=True, text=True
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"compile_aot: compiling {type(module).__name__} failed: {lines[-1] if lines else done.returncode}")
        os.replace(package, path)
    logger.info("compiled %s ahead of time: export %.1f s, compile %.1f s", path.name, exported_s, time.perf_counter() - start - exported_s)


def _compile_exported(program: str, package: str, metadata: str) -> None:
    """The child process: an exported program file -> an AOTInductor package file."""
    import torch._inductor

    exported = torch.export.load(program)
    torch._inductor.aoti_compile_and_package(
        exported, package_path=package, inductor_configs={"aot_inductor.metadata": json.loads(metadata)}
    )


def compile_module(module: torch.nn.Module) -> None:
    """Run ``module`` from its package from now on (compiled on its first call if not cached)."""
    if not isinstance(module.__dict__.get("forward"), AotForward):
        module.forward = AotForward(module)


def compile_aot(pipeline: Any, policy: Any) -> None:
    """Each hot-loop module as one ahead-of-time package."""
    from gesso.optimize import hot_loop_modules

    for module in hot_loop_modules(pipeline, policy).values():
        compile_module(module)


if __name__ == "__main__":
    import sys

    _compile_exported(*sys.argv[1:4])
