"""torch.compile for the hot loop.

``compile`` (regional) compiles each repeated block — the classes that set ``compile_region = True``:
the core's transformers, resnets and resamplers, and any plugin block that opts in — rather than
the whole UNet: blocks of the same shape share one compiled graph, so the first-run compile is a
fraction of a whole-model compile, while the fusions that matter (norms, activations, residual
adds around the matrix products) happen inside the blocks. ``compile_full`` compiles the whole
module for the last few percent, at a longer first run.

Each compiled block is kept in gesso's compile cache (:mod:`gesso.optimize.precompiled`), so a new
process loads it instead of tracing it again; a first compile runs the blocks' compilations in
parallel child processes (:mod:`gesso.optimize.parallel`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gesso.optimize import hot_loop_modules

#: ``torch.compile`` modes the compile optimizations take (``optimization_options.compile.mode``).
#: ``reduce-overhead`` and ``max-autotune`` are refused: they capture a CUDA graph inside each
#: compiled block, where ``cuda_graph`` captures the whole denoiser call.
MODES = ("default", "max-autotune-no-cudagraphs")


def options(mode: str = "default") -> dict[str, Any]:
    """``torch.compile``'s arguments: Inductor (``GESSO_COMPILE_BACKEND=aot_eager`` traces without
    generating code) in ``mode``; where the mode is left at ``default``, ``GESSO_COMPILE_MODE`` may
    choose another."""
    source = "mode"
    if mode == "default" and os.environ.get("GESSO_COMPILE_MODE"):
        mode, source = os.environ["GESSO_COMPILE_MODE"], "GESSO_COMPILE_MODE"
    if mode not in MODES:
        from gesso.config import ConfigError

        why = (
            " (it captures a CUDA graph inside each block; cuda_graph captures the whole step)"
            if mode in ("reduce-overhead", "max-autotune")
            else ""
        )
        raise ConfigError(f"{source} {mode!r} is not supported{why}; choose one of {', '.join(MODES)}")
    chosen: dict[str, Any] = {"backend": os.environ.get("GESSO_COMPILE_BACKEND", "inductor")}
    if mode != "default":
        chosen["mode"] = mode
    return chosen


def _allow_one_graph_per_block_shape() -> None:
    """Blocks of one class share a code object, compiled once per distinct shape; a UNet has more
    shapes than Dynamo's default of 8 recompiles per code object."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


def regions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost blocks of ``module`` whose class sets ``compile_region`` (a region inside another
    one, such as a resampler inside a resnet, is compiled as part of it)."""
    found: list[str] = []
    for name, block in module.named_modules():
        if getattr(type(block), "compile_region", False) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return [module.get_submodule(name) for name in found]


def compile_blocks(module: torch.nn.Module, mode: str = "default") -> None:
    """Compile each region of ``module`` in place."""
    from gesso.optimize import precompiled

    _allow_one_graph_per_block_shape()
    chosen = options(mode)
    for block in regions(module):
        if precompiled.enabled():
            precompiled.precompile_block(block, chosen)
        else:
            block.compile(fullgraph=True, dynamic=False, **chosen)


def compile_regional(pipeline: Any, policy: Any, mode: str = "default") -> None:
    """``torch.compile`` each repeated block of the hot-loop modules in place; a module's first call
    compiles its blocks side by side (:mod:`gesso.optimize.parallel`)."""
    from gesso.optimize import parallel, precompiled

    for module in hot_loop_modules(pipeline, policy).values():
        compile_blocks(module, mode)
        if precompiled.enabled():
            parallel.compile_together(module)


def compile_full(pipeline: Any, policy: Any, mode: str = "default") -> None:
    """``torch.compile`` each hot-loop module as one graph."""
    chosen = options(mode)
    for module in hot_loop_modules(pipeline, policy).values():
        module.compile(fullgraph=False, dynamic=False, **chosen)


def compile_vae(pipeline: Any, policy: Any, mode: str = "default") -> None:
    """Compile the image decoder's blocks as well (the decode is a large share of a short run)."""
    decoder = getattr(pipeline, policy.image_decoder, None)
    if isinstance(decoder, torch.nn.Module):
        compile_blocks(decoder, mode)
