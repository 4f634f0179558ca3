"""Model CPU offload: components wait in CPU memory and visit the GPU only while they run.

The family's ``offload_order`` lists components in the order a generation calls them; when one is
called, it moves to the execution device and the one before it goes back to the CPU, so at most
one large component is on the GPU at a time (peak memory: the UNet's weights plus activations).
Modules that conditioners run at every step (a ControlNet) visit the GPU together with the UNet.

Each component's weights stay in CPU memory for the whole run (:class:`HostWeights`): page-locked
on a CUDA device, so a visit to the GPU is one DMA copy per tensor instead of the driver's staged
copy from pageable memory, and the way back needs no copy at all, since a generation does not
change weights. A tensor that was changed or replaced while on the device is copied back first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gesso.device_transfer import page_locked

#: Page-locked memory comes in blocks of this size: CUDA's host allocator rounds every request up to
#: a power of two, so weights are packed into equal blocks rather than locked one by one.
BLOCK_BYTES = 64 * 2**20
_ALIGN = 256


class HostWeights:
    """The parameters and buffers of one module, kept in CPU memory and lent to a device.

    Tensors keep their identity (``tensor.data`` is swapped), so tied weights, hooks and references
    held elsewhere see the move. A tensor replaced while on the CPU (``module.to(dtype)``, as SDXL's
    float32 decoding does) is lent as it now is; one changed on the device (its version counter
    moved, or a new storage) is copied back. Edits through ``.data`` in place bypass both checks.
    """

    def __init__(self, module: torch.nn.Module, allocate: Callable[[int], torch.Tensor] | None = None) -> None:
        """``allocate(nbytes)`` gives the uint8 blocks the copies are packed into (page-locked ones
        for a CUDA device); without it, each tensor is copied to plain CPU memory."""
        tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
        self.tensors = list(tensors.values())
        self.host = _host_copies(self.tensors, allocate)
        self.slots = list(self.host)  # the first copies (page-locked), reused whenever a tensor has their dtype and shape
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host
        self.lent: list[tuple[int, int]] | None = None  # (data pointer, version) of each tensor on the device

    def lend(self, device: torch.device) -> None:
        """Copy every tensor to ``device`` (asynchronously from page-locked memory)."""
        for index, tensor in enumerate(self.tensors):
            host = self.host[index]
            if tensor.data_ptr() != host.data_ptr():  # replaced while on the CPU (a cast to another dtype)
                host = self._keep(index, tensor)
            tensor.data = host.to(device, non_blocking=host.is_pinned(), copy=True)
        self.lent = [(t.data_ptr(), t._version) for t in self.tensors]

    def take_back(self) -> None:
        """Point every tensor at its CPU copy again, copying back only what changed on the device."""
        if self.lent is None:
            return
        for index, (tensor, (pointer, version)) in enumerate(zip(self.tensors, self.lent)):
            host = self.host[index]
            if tensor.data_ptr() != pointer or tensor._version != version:
                host = self._keep(index, tensor)
            tensor.data = host
        self.lent = None

    def _keep(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Make ``tensor``'s present value its CPU copy: written into its first copy where it fits
        (the same dtype and shape: it stays page-locked), else kept as a new CPU tensor."""
        slot = self.slots[index]
        if slot.dtype == tensor.dtype and slot.shape == tensor.shape:
            if slot.data_ptr() != tensor.data_ptr():
                slot.copy_(tensor.detach())
            self.host[index] = slot
        else:
            self.host[index] = tensor.detach().to("cpu")
        return self.host[index]


def _host_copies(tensors: list[torch.Tensor], allocate: Callable[[int], torch.Tensor] | None) -> list[torch.Tensor]:
    """CPU copies of ``tensors`` with their shapes and memory layouts, packed into blocks from
    ``allocate``; a tensor larger than a block gets a block of its own."""
    if allocate is None:
        return [t.detach().to("cpu", copy=True) for t in tensors]
    copies: list[torch.Tensor] = []
    block, used = torch.empty(0, dtype=torch.uint8), BLOCK_BYTES
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if size > BLOCK_BYTES:
            region = allocate(size)
        else:
            if used + size > BLOCK_BYTES:
                block, used = allocate(BLOCK_BYTES), 0
            region = block[used : used + size]
            used += -(-size // _ALIGN) * _ALIGN
        layout = torch.empty_like(tensor, device="meta").stride()  # dense, in the tensor's own order (channels-last stays)
        copy = region.view(tensor.dtype).as_strided(tensor.shape, layout)
        copy.copy_(tensor.detach())
        copies.append(copy)
    return copies


def _page_locked_block(nbytes: int) -> torch.Tensor:
    return page_locked((nbytes,), torch.uint8)


class OffloadChain:
    """Components lent to the device one group at a time, in the order a generation calls them.

    A group is a component of the family's ``offload_order`` and, with the hot loop, the modules
    its conditioners run at every step (a ControlNet): they are on the device together.
    """

    def __init__(self, groups: list[list[torch.nn.Module]], device: torch.device) -> None:
        self.groups = groups
        self.modules = [module for group in groups for module in group]
        self.device = device
        allocate = _page_locked_block if device.type == "cuda" else None
        self.weights = {id(module): HostWeights(module, allocate) for module in self.modules}
        self._group_of = {id(module): group for group in groups for module in group}
        self.active: torch.nn.Module | None = None  # the first module of the group on the device

    def activate(self, module: torch.nn.Module) -> None:
        group = self._group_of[id(module)]
        if self.active is group[0]:
            return
        if self.active is not None:
            for lent in self._group_of[id(self.active)]:
                self.weights[id(lent)].take_back()
        for member in group:
            self.weights[id(member)].lend(self.device)
        self.active = group[0]


def model_cpu_offload(pipeline: Any, policy: Any, device: str | torch.device | None = None) -> OffloadChain:
    """Install the offload hooks; the pipeline keeps running on ``device`` (default: its device)."""
    target = torch.device(device) if device is not None else pipeline.device
    names = [n for n in policy.offload_order if isinstance(getattr(pipeline, n, None), torch.nn.Module)]
    groups = [[getattr(pipeline, n)] for n in names]
    listed = {id(group[0]) for group in groups}
    per_step = [
        module
        for conditioner in getattr(pipeline, "conditioners", [])
        for module in conditioner.modules().values()
        if isinstance(module, torch.nn.Module) and id(module) not in listed
    ]
    denoiser = next((group for name, group in zip(names, groups) if name == policy.hot_loop[0]), None) if policy.hot_loop else None
    if denoiser is not None:  # conditioners' modules (a ControlNet) run beside the main denoiser
        denoiser.extend(per_step)
    else:
        groups.extend([module] for module in per_step)
    chain = OffloadChain(groups, target)
    for module in chain.modules:
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
