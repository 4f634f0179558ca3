"""CUDA-graph capture of the denoiser call.

A denoising step of a 512x512 model launches about a thousand kernels; replaying them as one
captured graph removes the CPU launch cost between them. The graph is captured per input
signature (shapes, dtypes, devices and non-tensor arguments) on first use, after warm-up on a
side stream, and replayed with the inputs copied into its static buffers. The scheduler step stays
outside: its per-step constants are Python values, and it is a few element-wise kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gesso.optimize import hot_loop_modules

WARMUP_CALLS = 2


def _detached_copy(value: Any) -> Any:
    """A copy of the graph's output that the next replay cannot overwrite (dataclass outputs too)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: _detached_copy(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, tuple | list):
        return type(value)(_detached_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached_copy(v) for k, v in value.items()}
    return value


def _signature(flat: list[Any]) -> tuple[Any, ...]:
    return tuple((tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor) else x for x in flat)


class GraphedForward:
    """Wraps a module's ``forward``; captures one graph per input signature and replays it."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, list[Any], Any]] = {}
        self.pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if not tensors or tensors[0].device.type != "cuda" or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        key = (_signature(flat), spec)
        if key not in self.graphs:
            self.graphs[key] = self._capture(flat, spec)
        graph, static_flat, static_out = self.graphs[key]
        for static, value in zip(static_flat, flat):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        graph.replay()
        return _detached_copy(static_out)

    def _capture(self, flat: list[Any], spec: Any) -> tuple[torch.cuda.CUDAGraph, list[Any], Any]:
        static_flat = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(static_flat, spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                self.forward(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.forward(*args, **kwargs)
        self.pool = graph.pool()
        return graph, static_flat, static_out


def cuda_graph(pipeline: Any, policy: Any) -> None:
    """Replay each hot-loop module's forward from a CUDA graph (static shapes per signature)."""
    for module in hot_loop_modules(pipeline, policy).values():
        if not isinstance(module.forward, GraphedForward):
            module.forward = GraphedForward(module.forward)
