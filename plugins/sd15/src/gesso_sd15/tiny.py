"""A tiny random-weight SD1.5-shaped checkpoint in the published on-disk layout (for tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from gesso.tiny import TINY_VAE_CONFIG, randomise  # noqa: F401 - randomise re-exported: tests import it from here

#: Small configs with every structural feature of the full-size SD1.5 models.
UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE_CONFIG: dict[str, Any] = dict(TINY_VAE_CONFIG)
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}


def tiny_safety_checker_config() -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )


def write_tiny_checkpoint(folder: str | Path, *, safety_checker: bool = False, variant: str | None = None, seed: int = 0) -> Path:
    """Write model_index.json and every component; ``variant="fp16"`` also writes float16 files."""
    from gesso.nn import AutoencoderKL, UNet2DConditionModel
    from gesso.schedulers import PNDMScheduler
    from gesso.tiny import tiny_clip_text_config, write_clip_tokenizer, write_model_index
    from transformers import CLIPImageProcessor, CLIPTextModel

    from gesso_sd15.safety_checker import StableDiffusionSafetyChecker

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(tiny_clip_text_config())
    for module in (unet, vae, text_encoder):
        randomise(module, seed)
    dtype = torch.float16 if variant == "fp16" else None
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.to(dtype or torch.float32).save_pretrained(folder / name, variant=variant)
    write_clip_tokenizer(folder / "tokenizer")
    PNDMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    components: dict[str, tuple[str | None, str | None]] = {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "PNDMScheduler"),
        "safety_checker": (None, None),
        "feature_extractor": (None, None),
    }
    if safety_checker:
        StableDiffusionSafetyChecker(tiny_safety_checker_config()).save_pretrained(folder / "safety_checker")
        CLIPImageProcessor(crop_size=32, size=32).save_pretrained(folder / "feature_extractor")
        components["safety_checker"] = ("stable_diffusion", "StableDiffusionSafetyChecker")
        components["feature_extractor"] = ("transformers", "CLIPImageProcessor")
    write_model_index(folder, "StableDiffusionPipeline", components)
    return folder
