"""Tensors whose kernels were queued on another CUDA stream, handed to code that runs on the current one.

Two pieces of a step that do not depend on each other can run at the same time on one GPU when
their kernels go to two streams: a ControlNet and the UNet's down blocks and mid block, after which
the UNet first reads the net's residuals (``controlnet_side_stream`` in the ControlNet plugin). The
consumer must not read such tensors before the other stream has written them, so they travel as
:class:`InFlight`, and the consumer calls :func:`arrived` where it first reads them: its stream waits
for the other there, and not earlier, which is what lets the two overlap. Captured in a CUDA graph,
the wait becomes the edge that joins the graph's two branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class InFlight:
    """``value`` (tensors, or lists of them) being computed by kernels queued on ``stream``."""

    value: Any
    stream: torch.cuda.Stream

    def wait(self) -> Any:
        """Make the current stream wait for ``stream``'s work queued so far; then ``value`` is safe to read."""
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return self.value


def arrived(value: Any) -> Any:
    """``value`` ready to read on the current stream: an :class:`InFlight`'s value once waited for, anything else as it is."""
    return value.wait() if isinstance(value, InFlight) else value
