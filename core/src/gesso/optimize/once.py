"""Work that depends only on an input fixed for a whole image, done once an image instead of at
every denoising step.

Some of a step's work reads nothing that changes between steps: the prompt's cross-attention keys
and values (``cross_kv_once``), a UNet's addition embedding and projected context
(``conditioning_once``), a ControlNet's embedding of its control image (``control_embedding_once``,
from the ControlNet plugin). ``OncePerInput`` wraps a hot-loop module's ``forward``: before a call
it computes that work into buffers the module then reads, and it computes again only when the
input or the weights it depends on are not those of the last call.

"The same input" is decided without looking at values, which on a GPU would make the CPU wait:
the same memory (address, offset, shape, strides, dtype, device) and the same version counter
(every in-place write bumps it, through any view), with the last input kept referenced so that its
memory cannot be freed and handed to another tensor. The weights the same way (address and
version). The work runs eagerly, outside any CUDA graph: this wrapper goes around ``cuda_graph``'s,
so a replayed step reads the buffers where the capture found them. Buffers are kept per signature
(the results' shapes, dtypes and devices) and never reallocated once made, because a graph
captured for that signature reads them; later results are copied into them.

Two cases compute at every call instead: tensors made under ``torch.inference_mode`` keep no
version counter, so a write to them cannot be seen (the step still reads the buffers, which a
graph needs); and with gradients enabled the buffers are dropped, as the work must then be part of
the autograd graph (a CUDA graph steps aside there too).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gesso.optimize import wrapper_chain


def memory_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Where a tensor's values are and how often they were written (``RuntimeError`` for a tensor
    made under ``torch.inference_mode``, which keeps no version counter)."""
    return (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, tensor._version)


def argument_position(module: torch.nn.Module, argument: str) -> int | None:
    """Where ``argument`` sits among the positional arguments of ``module``'s forward."""
    try:
        names = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return None
    return names.index(argument) if argument in names else None


def argument_value(args: tuple[Any, ...], kwargs: dict[str, Any], argument: str, position: int | None) -> Any:
    """The value of ``argument`` (at ``position`` among the positional ones) in a call, ``None`` if not passed."""
    if argument in kwargs:
        return kwargs[argument]
    if position is not None and len(args) > position:
        return args[position]
    return None


class OncePerInput:
    """``forward`` of one module, with the work that depends only on ``argument`` done beforehand.

    ``compute(tensors)`` returns the results for the argument's tensors (see :meth:`inputs`);
    ``install(buffers)`` hands the module the buffers holding them (``None``: compute during the call
    again); ``weights()`` lists the tensors the results also depend on.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        argument: str,
        position: int | None,
        compute: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        install: Callable[[list[torch.Tensor] | None], None],
        weights: Callable[[], list[torch.Tensor]],
    ) -> None:
        self.forward = forward
        self.argument = argument
        self.position = position
        self.compute = compute
        self.install = install
        self.weights = weights
        self.buffers: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self.last_tensors: list[torch.Tensor] | None = None  # kept referenced: their memory stays theirs
        self.last_key: tuple[Any, ...] | None = None
        self.computations = 0  # times the work was done (what the tests count)

    def value(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The argument's value in this call; a subclass may gather several arguments."""
        return argument_value(args, kwargs, self.argument, self.position)

    def inputs(self, value: Any) -> list[torch.Tensor] | None:
        """The tensors the work depends on, from the argument's value: here one tensor (``None``,
        nothing to compute ahead, for anything else); a subclass may accept more."""
        return [value] if isinstance(value, torch.Tensor) else None

    def _key(self, tensors: list[torch.Tensor]) -> tuple[Any, ...] | None:
        """What the results depend on, or ``None`` when part of it cannot be tracked."""
        try:
            return tuple(memory_key(t) for t in tensors), tuple((w.data_ptr(), w._version) for w in self.weights())
        except RuntimeError:  # inference tensors: their writes cannot be seen
            return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.prepare(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def prepare(self, *args: Any, **kwargs: Any) -> None:
        """The work ahead of a call with these arguments, without the call (see :func:`prepare_ahead`)."""
        tensors = self.inputs(self.value(args, kwargs))
        if tensors is None or torch.is_grad_enabled():
            # nothing to compute ahead, or gradients must flow through the work
            self.clear()
            return
        key = self._key(tensors)
        if key is None or key != self.last_key:  # untracked (inference tensors): computed at every call
            self._compute(tensors)
            self.last_tensors, self.last_key = tensors, key

    @torch.no_grad()
    def _compute(self, tensors: list[torch.Tensor]) -> None:
        results = self.compute(tensors)
        signature = tuple((tuple(r.shape), r.dtype, r.device) for r in results)
        buffers = self.buffers.get(signature)
        if buffers is None:
            # Normal tensors even under inference mode, so that later calls outside it can write them.
            with torch.inference_mode(False):
                buffers = self.buffers[signature] = [r.clone() for r in results]
        else:  # in place: graphs captured for this signature read these very buffers
            for buffer, result in zip(buffers, results):
                buffer.copy_(result)
        self.install(buffers)
        self.computations += 1

    def clear(self) -> None:
        """Forget the last input: the module computes its work during the call again."""
        self.install(None)
        self.last_tensors = self.last_key = None


def once_wrappers(forward: Any) -> Iterator[OncePerInput]:
    """The ``OncePerInput`` wrappers at the top of ``forward``'s chain of wrappers, outermost first."""
    return itertools.takewhile(lambda f: isinstance(f, OncePerInput), wrapper_chain(forward))


def prepare_ahead(forward: Any, *args: Any, **kwargs: Any) -> None:
    """Do the work of each ``OncePerInput`` at the top of ``forward``'s chain of wrappers for a call
    with these arguments, without making the call. For a module that another module's graphed call
    runs (``controlnet_side_stream``): its once-wrappers must run outside that graph, before it, and
    the graph then calls what :func:`beneath_once_wrappers` returns."""
    for wrapper in once_wrappers(forward):
        wrapper.prepare(*args, **kwargs)


def beneath_once_wrappers(forward: Any) -> Any:
    """The callable that ``forward``'s ``OncePerInput`` wrappers call, without them."""
    return next(f for f in wrapper_chain(forward) if not isinstance(f, OncePerInput))


def wraps_already(module: torch.nn.Module, kind: type[OncePerInput]) -> bool:
    """Whether ``module.forward`` is, or wraps, a ``kind`` wrapper (applying twice would do the work twice).
    Only the once-wrappers at the top count: one beneath another wrapper, such as a CUDA graph's, does
    its work inside that wrapper's call."""
    return any(isinstance(wrapper, kind) for wrapper in once_wrappers(module.forward))
