"""Every resnet's time projection of a denoiser as one matrix product a step.

Each :class:`~gesso.nn.resnet.ResnetBlock2D` of a UNet projects the same time embedding, after the
same activation, with a ``Linear`` of its own: SD1.5's UNet runs 22 such products a step, each of two
rows, too small to read its weights at the GPU's memory speed, and 22 activations with them. Their
weights concatenated, one product gives every resnet its columns, and the resnets read them instead
of projecting (``fuse_time_projections``, an optimization; the values are those of the separate
products, up to the order of floating-point sums).

A denoiser takes part by calling :func:`fuse_resnet_time_projections` on the blocks it feeds with the
time embedding, keeping the result as ``time_projections`` and handing the blocks
``time_projections(emb)`` instead of ``emb``. A block takes part by setting
``time_embedding_feeds_resnets_only = True``: it passes the embedding to nothing but its
``ResnetBlock2D`` children, which is what makes handing it their projections instead safe.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gesso.nn.resnet import ResnetBlock2D


class TimeProjections(nn.Module):
    """The activation of the time embedding, then all the resnets' projections in one product."""

    def __init__(self, activation: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.activation = activation
        # Non-persistent: the state dict keeps each resnet's published time_emb_proj (views into these).
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(emb if self.activation is None else self.activation(emb), self.weight, self.bias)


class OwnColumns:
    """A resnet's forward pre-hook: the resnet receives its own columns of the joint projection as ``temb``.

    It runs before the resnet's (compiled) forward, so resnets of one shape still share one compiled
    block: the columns arrive as a view, whatever their offset. A class, not a closure, so that a
    resnet sent to a compile worker (:mod:`gesso.optimize.parallel`) still pickles."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if kwargs.get("temb") is not None:
            kwargs = {**kwargs, "temb": kwargs["temb"][:, self.start : self.stop]}
        elif len(args) > 1 and args[1] is not None:
            args = (args[0], args[1][:, self.start : self.stop], *args[2:])
        return args, kwargs


def _fusable(blocks: list[nn.Module]) -> list[ResnetBlock2D] | None:
    """The blocks' resnets, if the embedding reaches nothing else and they all project it alike."""
    if not blocks or not all(getattr(type(block), "time_embedding_feeds_resnets_only", False) for block in blocks):
        return None
    resnets = [m for block in blocks for m in block.modules() if isinstance(m, ResnetBlock2D)]
    if not resnets or any(
        r.time_emb_proj is None or r.time_emb_proj.bias is None or r.conditional_norm or r.time_projected for r in resnets
    ):
        return None
    alike = {
        (r.skip_time_act, type(r.nonlinearity), r.time_emb_proj.in_features, r.time_emb_proj.weight.dtype, r.time_emb_proj.weight.device)
        for r in resnets
    }
    return resnets if len(alike) == 1 else None


def fuse_resnet_time_projections(blocks: Iterable[nn.Module | None]) -> TimeProjections | None:
    """One :class:`TimeProjections` for every resnet of ``blocks``; ``None`` (nothing changed) when a
    block does not declare ``time_embedding_feeds_resnets_only`` or the resnets project differently.

    Each resnet's ``time_emb_proj`` weight and bias become views into the joint tensors, so memory
    does not grow and the state dict keeps the published names and values."""
    resnets = _fusable([block for block in blocks if block is not None])
    if resnets is None:
        return None
    projections = [r.time_emb_proj for r in resnets]
    weight = torch.cat([p.weight.detach() for p in projections])
    bias = torch.cat([p.bias.detach() for p in projections])
    start = 0
    for resnet, projection in zip(resnets, projections):
        stop = start + projection.out_features
        projection.weight = nn.Parameter(weight[start:stop], requires_grad=False)
        projection.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        resnet.time_projected = True
        resnet.register_forward_pre_hook(OwnColumns(start, stop), with_kwargs=True)
        start = stop
    first = resnets[0]
    return TimeProjections(None if first.skip_time_act else copy.deepcopy(first.nonlinearity), weight, bias)
