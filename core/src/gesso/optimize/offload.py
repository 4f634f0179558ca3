"""Model CPU offload: components wait in CPU memory and visit the GPU only while they run.

The family's ``offload_order`` lists components in the order a generation calls them; when one is
called, it moves to the execution device and the one before it goes back to the CPU, so at most
one large component is on the GPU at a time (peak memory: the UNet's weights plus activations).
"""

from __future__ import annotations

from typing import Any

import torch


class OffloadChain:
    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.modules = modules
        self.device = device
        self.active: torch.nn.Module | None = None

    def activate(self, module: torch.nn.Module) -> None:
        if self.active is module:
            return
        if self.active is not None:
            self.active.to("cpu")
        module.to(self.device)
        self.active = module


def model_cpu_offload(pipeline: Any, policy: Any, device: str | torch.device | None = None) -> OffloadChain:
    """Install the offload hooks; the pipeline keeps running on ``device`` (default: its device)."""
    target = torch.device(device) if device is not None else pipeline.device
    names = [n for n in policy.offload_order if isinstance(getattr(pipeline, n, None), torch.nn.Module)]
    modules = [getattr(pipeline, n) for n in names]
    chain = OffloadChain(modules, target)
    for module in modules:
        module.to("cpu")
        module.register_forward_pre_hook(lambda m, args, chain=chain: chain.activate(m))
        for name in ("encode", "decode"):  # the VAE is entered through these, not forward()
            method = getattr(module, name, None)
            if callable(method):
                setattr(module, name, _activating(method, module, chain))
    pipeline._execution_device = target
    pipeline.offload_chain = chain
    return chain


def _activating(method: Any, module: torch.nn.Module, chain: OffloadChain) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        chain.activate(module)
        return method(*args, **kwargs)

    return call
