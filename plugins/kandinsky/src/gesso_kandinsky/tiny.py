"""Tiny random-weight Kandinsky 2.2 checkpoints in the published on-disk layout (for tests).

The configs keep every structural feature of the published models (image-projection UNet with
"simple" cross-attention blocks, group-normed context, scale-shift resnets and the 8-channel
learned-variance output; MoVQ with attention stages and spatial norms; the prd-query prior) at a
width of 32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

EMBED_DIM = 32  # CLIP text width = projection = prior embedding = UNet encoder_hid_dim

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 8,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "cross_attention_norm": "group_norm",
    "encoder_hid_dim": EMBED_DIM,
    "encoder_hid_dim_type": "image_proj",
    "addition_embed_type": "image",
    "resnet_time_scale_shift": "scale_shift",
}
MOVQ_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "norm_type": "spatial",
    "num_vq_embeddings": 12,
    "vq_embed_dim": 4,
}
PRIOR_CONFIG: dict[str, Any] = {"num_attention_heads": 2, "attention_head_dim": 12, "embedding_dim": EMBED_DIM, "num_layers": 2}
SCHEDULER_CONFIG: dict[str, Any] = {  # the published decoder's DDPM schedule
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "thresholding": False,
}
PRIOR_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small_log",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "prediction_type": "sample",
}
IMAGE_SIZE = 32


def tiny_text_config() -> Any:
    from gesso.tiny import tiny_clip_text_config

    return tiny_clip_text_config(hidden_size=EMBED_DIM, projection_dim=EMBED_DIM)


def tiny_vision_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=EMBED_DIM,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=EMBED_DIM,
    )


def randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Small random weights everywhere; norm weights near 1 (zero-initialised layers would hide wiring bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ("norm" in name and name.endswith("weight")) or name.endswith("clip_std"):
                param.copy_(1 + std * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))


PRIOR_INDEX = {
    "prior": ("diffusers", "PriorTransformer"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "UnCLIPScheduler"),
    "image_processor": ("transformers", "CLIPImageProcessor"),
}
DECODER_INDEX = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "scheduler": ("diffusers", "DDPMScheduler"),
    "movq": ("diffusers", "VQModel"),
}


def write_tiny_checkpoint(folder: str | Path, *, layout: str = "combined", seed: int = 0, prior_repo: str | None = None) -> Path:
    """Write a tiny checkpoint with gesso's own classes.

    ``layout``: ``"combined"`` (one folder, ``prior_*`` components), ``"decoder"`` (unet, scheduler,
    movq; with ``prior_repo`` a README.md whose front matter names that prior) or ``"prior"``.
    """
    from gesso.nn import UNet2DConditionModel
    from gesso.schedulers import DDPMScheduler, UnCLIPScheduler
    from gesso.tiny import write_clip_tokenizer, write_model_index
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from gesso_kandinsky import unet as _blocks  # noqa: F401 - the UNet's blocks
    from gesso_kandinsky.movq import VQModel
    from gesso_kandinsky.prior_transformer import PriorTransformer

    if layout not in ("combined", "decoder", "prior"):
        raise ValueError(f"layout must be 'combined', 'decoder' or 'prior', not {layout!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    prefix = "prior_" if layout == "combined" else ""
    index: dict[str, tuple[str | None, str | None]] = {}
    if layout in ("combined", "decoder"):
        for offset, (name, module) in enumerate((("unet", UNet2DConditionModel(**UNET_CONFIG)), ("movq", VQModel(**MOVQ_CONFIG)))):
            randomise(module, seed + offset)
            module.save_pretrained(folder / name)
        DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
        index.update(DECODER_INDEX)
    if layout in ("combined", "prior"):
        modules = {
            "prior": PriorTransformer(**PRIOR_CONFIG),
            "text_encoder": CLIPTextModelWithProjection(tiny_text_config()),
            "image_encoder": CLIPVisionModelWithProjection(tiny_vision_config()),
        }
        for offset, (name, module) in enumerate(modules.items()):
            randomise(module, seed + 10 + offset)
            module.save_pretrained(folder / f"{prefix}{name}")
        write_clip_tokenizer(folder / f"{prefix}tokenizer")
        UnCLIPScheduler.from_config(PRIOR_SCHEDULER_CONFIG).save_pretrained(folder / f"{prefix}scheduler")
        CLIPImageProcessor(crop_size=IMAGE_SIZE, size=IMAGE_SIZE).save_pretrained(folder / f"{prefix}image_processor")
        index.update({f"{prefix}{name}": pair for name, pair in PRIOR_INDEX.items()})
    class_name = {"combined": "KandinskyV22CombinedPipeline", "decoder": "KandinskyV22Pipeline", "prior": "KandinskyV22PriorPipeline"}[
        layout
    ]
    write_model_index(folder, class_name, index)
    if prior_repo is not None:
        write_model_card(folder, prior_repo)
    return folder


def write_model_card(folder: str | Path, prior_repo: str) -> Path:
    """A README.md whose front matter names the decoder's prior, as the published decoder's does."""
    path = Path(folder) / "README.md"
    path.write_text(
        f"---\nlicense: apache-2.0\nprior:\n- {prior_repo}\ntags:\n- text-to-image\n- kandinsky\n---\n\n# A tiny Kandinsky 2.2 decoder\n",
        encoding="utf-8",
    )
    return path
