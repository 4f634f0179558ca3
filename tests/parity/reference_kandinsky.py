"""Tiny Kandinsky 2.2 checkpoints written by the reference library's own ``save_pretrained`` (test-only oracle).

The configs are gesso-kandinsky's tiny ones, so both sides build the same shapes; the weights are
random, drawn here, and saved by the reference in its three layouts: a combined folder
(``KandinskyV22CombinedPipeline``), a decoder folder (``KandinskyV22Pipeline``) and a prior folder
(``KandinskyV22PriorPipeline``). The decoder and prior folders hold the same weights as the combined one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from gesso.tiny import write_clip_tokenizer


def reference_components(folder: Path, seed: int = 0) -> dict[str, Any]:
    import diffusers
    from gesso_kandinsky.tiny import (
        IMAGE_SIZE,
        MOVQ_CONFIG,
        PRIOR_CONFIG,
        PRIOR_SCHEDULER_CONFIG,
        SCHEDULER_CONFIG,
        UNET_CONFIG,
        randomise,
        tiny_text_config,
        tiny_vision_config,
    )
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    movq = diffusers.VQModel(**MOVQ_CONFIG)
    prior = diffusers.PriorTransformer(**PRIOR_CONFIG)
    text_encoder = CLIPTextModelWithProjection(tiny_text_config())
    image_encoder = CLIPVisionModelWithProjection(tiny_vision_config())
    for index, module in enumerate((unet, movq, prior, text_encoder, image_encoder)):
        randomise(module, seed + index)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_source"))
    return {
        "unet": unet,
        "scheduler": diffusers.DDPMScheduler.from_config(SCHEDULER_CONFIG),
        "movq": movq,
        "prior_prior": prior,
        "prior_image_encoder": image_encoder,
        "prior_text_encoder": text_encoder,
        "prior_tokenizer": tokenizer,
        "prior_scheduler": diffusers.UnCLIPScheduler.from_config(PRIOR_SCHEDULER_CONFIG),
        "prior_image_processor": CLIPImageProcessor(crop_size=IMAGE_SIZE, size=IMAGE_SIZE),
    }


def write_reference_kandinsky(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``combined/``, ``decoder/`` and ``prior/`` under ``folder``; returns their paths."""
    import diffusers

    components = reference_components(folder, seed)
    paths = {name: folder / name for name in ("combined", "decoder", "prior")}
    diffusers.KandinskyV22CombinedPipeline(**components).save_pretrained(paths["combined"])
    decoder = {name: components[name] for name in ("unet", "scheduler", "movq")}
    diffusers.KandinskyV22Pipeline(**decoder).save_pretrained(paths["decoder"])
    prior = {name.removeprefix("prior_"): value for name, value in components.items() if name.startswith("prior_")}
    diffusers.KandinskyV22PriorPipeline(**prior).save_pretrained(paths["prior"])
    return paths
