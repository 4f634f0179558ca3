"""Conditioners: extra conditioning that a plugin applies to another family's denoising loop.

A conditioner is attached to a pipeline (``from_pretrained(..., controlnet=net)`` does it through
the conditioner hook). The loop asks it, once per call, to ``prepare`` its inputs from the call
arguments it declared in ``call_parameters``, then, at each step, for extra keyword arguments to
the denoiser (ControlNet returns ``down_block_additional_residuals`` and
``mid_block_additional_residual``). Contributions of several conditioners are summed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class Conditioner:
    """Base class; override what applies. ``call_parameters`` maps call argument -> default."""

    name: ClassVar[str] = ""
    call_parameters: ClassVar[dict[str, Any]] = {}

    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules it runs (moved with ``pipeline.to`` and listed for optimizations)."""
        return {}

    def default_size(self, call: Any) -> tuple[int, int] | None:
        """(height, width) to use when the caller gave none, e.g. the control image's."""
        return None

    def check_inputs(self, call: Any) -> None:
        """Raise ValueError/TypeError as the reference does for bad arguments."""

    def prepare(self, pipeline: Any, call: Any, conditioning: Any, device: torch.device, dtype: torch.dtype) -> None:
        """Turn call arguments into tensors once per call."""

    def step_inputs(
        self, pipeline: Any, call: Any, step: int, timestep: torch.Tensor, model_input: torch.Tensor, conditioning: Any
    ) -> dict[str, Any]:
        """Extra denoiser keyword arguments for this step ({} for none)."""
        return {}


def merge_step_inputs(contributions: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum residual lists and tensors key by key, so several conditioners compose."""
    merged: dict[str, Any] = {}
    for contribution in contributions:
        for key, value in contribution.items():
            if key not in merged or value is None:
                merged.setdefault(key, value)
            elif isinstance(value, list | tuple):
                merged[key] = [a + b for a, b in zip(merged[key], value, strict=True)]
            else:
                merged[key] = merged[key] + value
    return merged
