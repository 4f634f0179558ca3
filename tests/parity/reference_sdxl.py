"""Tiny SDXL checkpoints written by the reference library's own ``save_pretrained`` (test-only oracle).

The configs are gesso-sdxl's tiny ones, so both sides build the same shapes; the weights are
random, drawn here, and saved by the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gesso.tiny import randomise, write_clip_tokenizer


def write_reference_sdxl(folder: Path, *, variant: str | None = None, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    import diffusers
    from gesso_sdxl.tiny import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoder_configs
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    first, second = text_encoder_configs()
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(first)
    text_encoder_2 = CLIPTextModelWithProjection(second)
    for index, module in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomise(module, seed + index)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_source"))
    pipeline = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    if variant == "fp16":
        pipeline.to(torch.float16)
    pipeline.save_pretrained(folder, variant=variant)
    return folder
