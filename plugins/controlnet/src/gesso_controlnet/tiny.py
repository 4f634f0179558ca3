"""Tiny random-weight ControlNet checkpoints in the published layout (for tests).

The configs match the sd15 family's tiny UNet (two blocks, widths 32/64, cross-attention width 32),
with a conditioning embedding that halves once, as the tiny two-block VAE does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SD15_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "in_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "conditioning_embedding_out_channels": [16, 32],
}

#: Matches the sdxl family's tiny UNet: ``text_time`` added conditioning (six time ids of width 8
#: plus a pooled text embedding of 32), linear projections, two transformer layers in the second block.
SDXL_CONFIG: dict[str, Any] = {
    **SD15_CONFIG,
    "cross_attention_dim": 64,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}


def randomise(module: torch.nn.Module, seed: int, std: float = 0.05, image_std: float = 0.3) -> None:
    """Random weights everywhere: the zero-initialised projections of a fresh net would hide wiring bugs.

    The control-image embedding gets larger weights (``image_std``), so that the control image
    visibly changes a tiny model's output rather than vanishing through three small convolutions.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            spread = image_std if name.startswith("controlnet_cond_embedding.") else std
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + spread * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(spread * torch.randn(param.shape, generator=generator))


def write_tiny_controlnet(
    folder: str | Path, *, config: dict[str, Any] | None = None, seed: int = 0, variant: str | None = None, **overrides: Any
) -> Path:
    """Write a tiny ControlNet (``config.json`` and safetensors weights) with gesso's own model."""
    from gesso_controlnet.model import ControlNetModel

    model = ControlNetModel.from_config({**(config or SD15_CONFIG), **overrides})
    randomise(model, seed)
    if variant == "fp16":
        model = model.to(torch.float16)
    model.save_pretrained(folder, variant=variant)
    return Path(folder)
