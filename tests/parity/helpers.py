"""What the parity tests share: calling a pipeline the same way on both sides."""

from __future__ import annotations

from typing import Any

import torch


def generate(pipeline: Any, **kwargs: Any) -> Any:
    """Call ``pipeline`` with a seeded CPU generator (``generators=N``: a list of N, seeds seed..seed+N-1),
    4 steps and ``output_type="np"`` unless the call says otherwise."""
    seed = kwargs.pop("seed", 0)
    generator = (
        [torch.Generator().manual_seed(seed + i) for i in range(kwargs.pop("generators"))]
        if "generators" in kwargs
        else torch.Generator().manual_seed(seed)
    )
    return pipeline(
        generator=generator, num_inference_steps=kwargs.pop("num_inference_steps", 4), output_type=kwargs.pop("output_type", "np"), **kwargs
    )
