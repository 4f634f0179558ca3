"""A tiny random-weight SDXL-shaped checkpoint in the published on-disk layout (for tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from gesso.tiny import TINY_VAE_CONFIG

#: Small configs with every structural feature of the full-size SDXL base models: two text
#: encoders whose widths add up to the cross-attention width (32 + 32), the "text_time" added
#: embedding fed by six time ids and the second encoder's projection (6 * 8 + 32 = 80), linear
#: transformer projections, several transformer layers in a block, and a VAE that asks for float32.
TEXT_ENCODER_WIDTH = 32
TEXT_ENCODER_2_WIDTH = 32
UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 6 * 8 + TEXT_ENCODER_2_WIDTH,
    "cross_attention_dim": TEXT_ENCODER_WIDTH + TEXT_ENCODER_2_WIDTH,
    "norm_num_groups": 32,
}
VAE_CONFIG: dict[str, Any] = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
}


def text_encoder_configs() -> tuple[Any, Any]:
    """The two CLIP text configs (three layers each, so ``clip_skip=1`` picks a distinct layer)."""
    from gesso.tiny import tiny_clip_text_config

    first = tiny_clip_text_config(TEXT_ENCODER_WIDTH, layers=3, hidden_act="quick_gelu")
    second = tiny_clip_text_config(TEXT_ENCODER_2_WIDTH, projection_dim=TEXT_ENCODER_2_WIDTH, layers=3, hidden_act="gelu")
    return first, second


def write_tiny_checkpoint(
    folder: str | Path, *, variant: str | None = None, seed: int = 0, force_zeros_for_empty_prompt: bool = True
) -> Path:
    """Write model_index.json and every component; ``variant="fp16"`` writes float16 weight files."""
    from gesso.nn import AutoencoderKL, UNet2DConditionModel
    from gesso.schedulers import EulerDiscreteScheduler
    from gesso.tiny import randomise, write_clip_tokenizer, write_model_index
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    first, second = text_encoder_configs()
    modules = {
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": CLIPTextModel(first),
        "text_encoder_2": CLIPTextModelWithProjection(second),
    }
    dtype = torch.float16 if variant == "fp16" else torch.float32
    for index, (name, module) in enumerate(modules.items()):
        randomise(module, seed + index)
        module.to(dtype).save_pretrained(folder / name, variant=variant)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    path = write_model_index(
        folder,
        "StableDiffusionXLPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "scheduler": ("diffusers", "EulerDiscreteScheduler"),
            "image_encoder": (None, None),
            "feature_extractor": (None, None),
        },
    )
    index = json.loads(path.read_text(encoding="utf-8"))
    index["force_zeros_for_empty_prompt"] = force_zeros_for_empty_prompt
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder
