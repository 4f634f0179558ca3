"""Gaussian noise drawn as the reference draws it, without stopping the GPU.

Seeds reproduce images only if every sample of noise comes from the same generator in the same
order, so a CPU generator draws on the CPU even when the pipeline runs on a GPU. Moving the result
with a plain ``.to("cuda")`` copies from pageable memory, which waits for all work queued on the
GPU: an ancestral scheduler does that at every step, so the CPU can no longer queue the next step
while the GPU runs this one. Here the noise is drawn straight into page-locked memory and copied
without waiting; PyTorch's pinned-memory cache keeps the buffer until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gesso.device_transfer import page_locked

__all__ = ["randn_tensor"]


def randn_tensor(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``, the same values the reference draws.

    A CPU generator draws on the CPU, whatever ``device`` is; a list of generators draws one batch
    element from each, in order. A GPU generator must be on ``device``'s kind of device.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    generators = list(generator) if isinstance(generator, list | tuple) else [generator]
    first = generators[0]
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {first.device.type}.")
        draw_device = torch.device("cpu")
    to_gpu = draw_device.type == "cpu" and device.type == "cuda"
    if to_gpu:
        noise = page_locked(shape, dtype if dtype is not None else torch.get_default_dtype())
    else:
        noise = torch.empty(shape, device=draw_device, dtype=dtype)
    if len(generators) == 1:
        noise.normal_(generator=first)
    else:
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}: pass one generator per batch element")
        for row, g in zip(noise, generators, strict=True):
            row.normal_(generator=g)
    return noise.to(device, non_blocking=to_gpu and noise.is_pinned())
