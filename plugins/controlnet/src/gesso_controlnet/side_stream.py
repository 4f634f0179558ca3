"""``controlnet_side_stream``: the ControlNet runs on a second CUDA stream while the UNet's down blocks run.

Neither the UNet's down blocks nor its mid block read the net's residuals: it adds them to its skips
and to the mid block's output only after that block. Run one after the other, the two leave the GPU
partly idle: at 512x512 the kernels of their 16x16 and 8x8 levels fill a fraction of the
multiprocessors, and each kernel of a graph waits about a microsecond for the one before. On two
streams, each fills the other's gaps.

The UNet runs the net itself, so that under ``cuda_graph`` one graph holds both, the net on a forked
branch that joins where the UNet first reads the residuals (``gesso.streams``). At each step the
conditioner hands the UNet the net's arguments instead of its residuals. The UNet calls the net
beneath its once-an-image wrappers (``control_embedding_once``, ``cross_kv_once``,
``conditioning_once``) and does their work itself, outside any graph, as they do when the net is
called on its own: before each replay (``before_replay``), and inside the UNet's call, after its
forward pre-hooks have put the net on the GPU under ``offload``. The same kernels on the same
inputs: the images are those of the net run before the UNet.

Order 75: inside ``cuda_graph`` (80), which then captures the UNet's call with the net in it, and
watches the net's weights as well as the UNet's (``also_reads``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from gesso.optimize import wrapper_chain
from gesso.optimize.once import beneath_once_wrappers, prepare_ahead
from gesso.streams import InFlight

from gesso_controlnet.conditioner import NET_CALL, ControlNetConditioner

logger = logging.getLogger("gesso")


class ControlNetAlongside:
    """``forward`` of the UNet of a ControlNet pipeline: given a net call (``NET_CALL``), it runs the net
    on a stream of its own, and its own blocks on the current one, which waits for the net only
    where it reads the residuals. Without a CUDA device the net simply runs first."""

    def __init__(self, forward: Any, conditioner: ControlNetConditioner) -> None:
        self.forward = forward
        self.conditioner = conditioner
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def also_reads(self) -> list[torch.nn.Module]:
        """The modules besides the UNet whose weights a captured call reads (``cuda_graph``)."""
        return [self.conditioner.controlnet]

    def before_replay(self, *args: Any, **kwargs: Any) -> None:
        """The net's once-an-image work for this call, outside the graph (``cuda_graph`` calls it
        with the call's own arguments before each replay)."""
        net_call = kwargs.get(NET_CALL)
        if net_call is not None:
            prepare_ahead(self.conditioner.controlnet.forward, **net_call["arguments"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        net_call = kwargs.get(NET_CALL)
        if net_call is None:
            return self.forward(*args, **kwargs)
        device = net_call["arguments"]["sample"].device
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            # (not in a capture: its replays get the work from before_replay, on the call's own tensors)
            self.before_replay(*args, **kwargs)
        del kwargs[NET_CALL]
        net = beneath_once_wrappers(self.conditioner.controlnet.forward)
        if device.type != "cuda":
            return self.forward(*args, **kwargs, **self.conditioner.residuals(net, **net_call))
        current, side = torch.cuda.current_stream(device), self._stream(device)
        side.wait_stream(current)  # the net's inputs were written on the current stream
        with torch.cuda.stream(side):
            residuals = self.conditioner.residuals(net, **net_call)
        try:
            return self.forward(*args, **kwargs, **{name: InFlight(value, side) for name, value in residuals.items()})
        finally:
            current.wait_stream(side)  # joined even if the UNet never read them (a graph's capture needs it)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]


def controlnet_side_stream(pipeline: Any, policy: Any) -> None:
    """Run the ControlNet on a second CUDA stream, alongside the UNet's down blocks and mid block."""
    conditioner = next((c for c in getattr(pipeline, "conditioners", []) if isinstance(c, ControlNetConditioner)), None)
    unet = getattr(pipeline, "unet", None)
    if conditioner is None or not isinstance(unet, torch.nn.Module):
        logger.info("controlnet_side_stream: no ControlNet attached to a UNet; nothing changed")
        return
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in (unet, conditioner.controlnet)):
        # a whole-module compile goes through the module's __call__, which the UNet's call would bypass for the net
        logger.info("controlnet_side_stream: the UNet or the ControlNet is compiled whole (compile_full); nothing changed")
        return
    if any(isinstance(forward, ControlNetAlongside) for forward in wrapper_chain(unet.forward)):
        return
    unet.forward = ControlNetAlongside(unet.forward, conditioner)
    conditioner.runs_in_unet = True
