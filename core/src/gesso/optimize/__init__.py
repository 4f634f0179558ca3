"""Built-in optimizations, registered through the optimization hook like any plugin's.

Each optimization is a function ``apply(pipeline, policy)`` that changes a loaded pipeline in place
within what the family's :class:`~gesso.contract.ExecutionPolicy` allows.
"""

from __future__ import annotations

from typing import Any

import torch

#: Named sets of optimizations, applied in their registered ``order``.
PRESETS: dict[str, list[str]] = {"fast": ["channels_last", "compile"]}


def hot_loop_modules(pipeline: Any, policy: Any) -> dict[str, torch.nn.Module]:
    modules = {name: getattr(pipeline, name, None) for name in policy.hot_loop}
    for conditioner in getattr(pipeline, "conditioners", []):
        modules.update(conditioner.modules())
    return {name: m for name, m in modules.items() if isinstance(m, torch.nn.Module)}


def channels_last(pipeline: Any, policy: Any) -> None:
    """Convolutions in NHWC memory order, the layout tensor cores read without transposes."""
    for module in hot_loop_modules(pipeline, policy).values():
        module.to(memory_format=torch.channels_last)
    vae = getattr(pipeline, "vae", None)
    if isinstance(vae, torch.nn.Module):
        vae.to(memory_format=torch.channels_last)


def compile_hot_loop(pipeline: Any, policy: Any) -> None:
    """``torch.compile`` each module of the hot loop (the UNet, a ControlNet), keeping its attributes."""
    for module in hot_loop_modules(pipeline, policy).values():
        module.compile(fullgraph=False, dynamic=False)
