"""Tiny checkpoints written by the reference library's own ``save_pretrained`` (test-only oracle).

The configs are the ones gesso's families use for their tiny checkpoints, so both sides build the
same shapes; the weights are random, drawn here, and saved by the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gesso.tiny import tiny_clip_text_config, write_clip_tokenizer


def randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    from gesso_sd15.tiny import randomise as family_randomise

    family_randomise(module, seed, std)


def write_reference_sd15(folder: Path, *, safety_checker: bool = True, variant: str | None = None, seed: int = 0) -> Path:
    import diffusers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from gesso_sd15.tiny import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_safety_checker_config
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(tiny_clip_text_config())
    modules = [unet, vae, text_encoder]
    checker = processor = None
    if safety_checker:
        checker = StableDiffusionSafetyChecker(tiny_safety_checker_config())
        processor = CLIPImageProcessor(crop_size=32, size=32)
        modules.append(checker)
    for index, module in enumerate(modules):
        randomise(module, seed + index)
    if checker is not None:  # thresholds no random embedding reaches; tests lower them as they need
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(1.0)
            checker.special_care_embeds_weights.fill_(1.0)
    tokenizer_folder = write_clip_tokenizer(folder / "_tokenizer_source")
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder),
        unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=False,
    )
    if variant == "fp16":
        pipeline.to(torch.float16)
    pipeline.save_pretrained(folder, variant=variant)
    return folder
