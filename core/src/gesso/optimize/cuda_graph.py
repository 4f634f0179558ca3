"""CUDA-graph capture of the modules a generation calls with fixed shapes.

A denoising step of a 512x512 model launches about a thousand kernels and a CLIP text encoder a few
hundred; replaying them as one captured graph removes the CPU launch cost between them. A graph is
captured per input signature (shapes, dtypes, devices and non-tensor arguments) on first use, after
warm-up on a side stream, and replayed with the inputs copied into its static buffers. The
scheduler step stays outside: its per-step constants are Python values, and it is a few
element-wise kernels.

A graph reads the weights at the addresses they had when it was captured. Whatever moves them
(model CPU offload lends them to the GPU anew for every image; ``module.to(dtype)`` replaces them)
makes the graph stale, so each call compares the weights' addresses with the captured ones and
captures again when they differ. A capture costs about ``WARMUP_CALLS`` eager calls; a ``per_image``
module whose weights moved after serving no more calls than that (a text encoder or decoder under
offload, lent to the GPU for one or two calls an image) runs eager from then on, as graphs cannot pay
there. A denoiser keeps capturing: its calls an image are the steps, which the next call may raise.

A graphed module may run another one inside its call (the UNet runs the ControlNet under
``controlnet_side_stream``): the inner module's kernels then become part of the outer graph. A
wrapper beneath the graph says what that needs through two optional methods, found down the chain
of wrappers: ``also_reads()``, the other modules whose weights the graph reads and watches as its
own, and ``before_replay(*args, **kwargs)``, the Python work of a call that a replay would skip
(the inner module's once-an-image work, done outside the graph as its own wrappers would).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gesso.optimize import hot_loop_modules, per_image_modules, wrapper_chain

logger = logging.getLogger("gesso")

WARMUP_CALLS = 2

#: How deep this thread is in graphed calls that run their forward (warm-up or capture).
_running = threading.local()


def _running_depth() -> int:
    return getattr(_running, "depth", 0)


def _down_the_chain(forward: Any, method: str) -> Callable[..., Any] | None:
    """``method`` of the first wrapper down ``forward``'s chain of wrappers that has it."""
    return next((getattr(f, method) for f in wrapper_chain(forward) if callable(getattr(f, method, None))), None)


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


class GraphPool:
    """The memory pool that a pipeline's graphs share.

    Sharing is safe because the graphs replay one after another on one stream and every replay's
    output is copied out before the next replay: a graph's intermediates may reuse another graph's
    intermediates, never its static inputs or outputs, which stay referenced. One pool keeps the
    memory of the text encoders', the UNet's and the decoder's graphs to what the largest needs.

    The pool is a ``torch.cuda.MemPool`` owned here, so it outlives its graphs: a pool known only by
    a graph's handle is released with its last graph, and capturing into that handle again (every
    graph of a pipeline dropped at once, as when offload moves their weights) fails inside PyTorch.
    """

    def __init__(self) -> None:
        self._memory: Any = None

    @property
    def handle(self) -> Any:
        """The pool's id for ``torch.cuda.graph(pool=...)``; the pool is made on first use, on the GPU."""
        if self._memory is None:
            self._memory = torch.cuda.MemPool()
        return self._memory.id


class GraphedForward:
    """Wraps a module's ``forward``; captures one graph per input signature and replays it.

    ``module`` is the module whose weights the graphs read, with the modules that ``forward``'s
    ``also_reads()`` names: when any of their weights has moved since the capture, the graphs are
    dropped and captured again, or, with ``give_way_to_eager``, given up for good when they served
    too few calls to pay for their capture. Called while another graphed module runs its forward,
    it runs its own forward: its kernels go into that module's warm-up or capture. ``forward``'s
    ``before_replay`` runs before each replay.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        module: torch.nn.Module | None = None,
        pool: GraphPool | None = None,
        give_way_to_eager: bool = False,
    ) -> None:
        self.forward = forward
        self.weights = list(dict.fromkeys([*module.parameters(), *module.buffers()])) if module is not None else []
        self.also_reads: Callable[[], Iterable[torch.nn.Module]] | None = _down_the_chain(forward, "also_reads")
        self.before_replay = _down_the_chain(forward, "before_replay")
        self._others: tuple[tuple[torch.nn.Module, ...], list[torch.Tensor]] = ((), [])  # also_reads' modules, their weights
        self.placement: tuple[int, ...] = self._placement()
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, list[Any], Any]] = {}
        self.pool = pool if pool is not None else GraphPool()
        self.captures = 0
        self.calls_since_capture = 0
        self.give_way_to_eager = give_way_to_eager
        self.eager = False

    def _placement(self) -> tuple[int, ...]:
        placement = tuple(map(torch.Tensor.data_ptr, self.weights))
        if self.also_reads is None:
            return placement
        modules = tuple(self.also_reads())
        if len(modules) != len(self._others[0]) or any(a is not b for a, b in zip(modules, self._others[0])):
            # listed once per set of modules, as self.weights is: a call walks no module tree
            self._others = modules, [w for m in modules for w in dict.fromkeys([*m.parameters(), *m.buffers()])]
        return placement + tuple(map(torch.Tensor.data_ptr, self._others[1]))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _running_depth():  # inside another graphed module's warm-up or capture: part of its graph
            return self.forward(*args, **kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if self.eager or not tensors or tensors[0].device.type != "cuda" or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        placement = self._placement()
        if placement != self.placement:
            self._weights_moved()
            self.placement = placement
            if self.eager:
                return self.forward(*args, **kwargs)
        key = (_signature(flat), spec)
        if key not in self.graphs:
            self.graphs[key] = self._capture(flat, spec)
            self.calls_since_capture = 0
        self.calls_since_capture += 1
        graph, static_flat, static_out = self.graphs[key]
        for static, value in zip(static_flat, flat):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        if self.before_replay is not None:
            self.before_replay(*args, **kwargs)
        graph.replay()
        return _detached_copy(static_out)

    def _weights_moved(self) -> None:
        """Drop the stale graphs; stop graphing when the last ones served too few calls to pay for their capture."""
        if self.give_way_to_eager and self.graphs and self.calls_since_capture <= WARMUP_CALLS:
            self.eager = True
            logger.debug("weights moved after %d graphed call(s): running eager from now on", self.calls_since_capture)
        elif self.graphs:
            logger.debug("weights moved since their CUDA graphs were captured: capturing again")
        self.graphs.clear()

    def _capture(self, flat: list[Any], spec: Any) -> tuple[torch.cuda.CUDAGraph, list[Any], Any]:
        static_flat = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(static_flat, spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        _running.depth = _running_depth() + 1
        try:
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_CALLS):
                    self.forward(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool.handle):
                static_out = self.forward(*args, **kwargs)
        finally:
            _running.depth -= 1
        self.captures += 1
        return graph, static_flat, static_out


def _keep_float32(pipeline: Any, policy: Any, path: str) -> None:
    """Cast a component that the family runs in float32 at run time (SDXL's VAE with ``force_upcast``)
    once, now: its per-image cast would move the weights and make every image capture anew."""
    component = path.split(".")[0]
    module = getattr(pipeline, component, None)
    key = policy.float32_when.get(component)
    if key and isinstance(module, torch.nn.Module) and getattr(module.config, key, False) and module.dtype != torch.float32:
        module.to(dtype=torch.float32)


def cuda_graph(pipeline: Any, policy: Any) -> None:
    """Replay the hot loop's modules and the family's ``per_image`` modules (text encoders, the VAE
    decoder) from CUDA graphs captured per input signature, all in one memory pool."""
    pool = GraphPool()
    for path in policy.per_image:
        _keep_float32(pipeline, policy, path)
    for per_image, modules in ((False, hot_loop_modules(pipeline, policy)), (True, per_image_modules(pipeline, policy))):
        for module in modules.values():
            if not isinstance(module.forward, GraphedForward):
                module.forward = GraphedForward(module.forward, module, pool, give_way_to_eager=per_image)
