"""Registers the sdxl family with gesso."""

from __future__ import annotations

from collections.abc import Callable

from gesso import hookimpl
from gesso.contract import ExecutionPolicy, ModelFamily

#: Call parameters SDXL adds to the run config, with the reference pipeline's defaults.
CONFIG_KEYS = {
    "prompt_2": None,
    "negative_prompt_2": None,
    "original_size": None,
    "crops_coords_top_left": (0, 0),
    "target_size": None,
    "negative_original_size": None,
    "negative_crops_coords_top_left": (0, 0),
    "negative_target_size": None,
    "denoising_end": None,
    "guidance_rescale": 0.0,
}


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    register(
        ModelFamily(
            name="sdxl",
            pipeline="gesso_sdxl.pipeline:StableDiffusionXLPipeline",
            pipeline_class_names=("StableDiffusionXLPipeline",),
            description="Stable Diffusion XL (1024x1024, two CLIP text encoders, size and crop conditioning)",
            config_defaults="gesso_sdxl:defaults.yaml",
            config_keys=CONFIG_KEYS,
            execution_policy=ExecutionPolicy(
                float32_when={"vae": "force_upcast"},
                offload_order=("text_encoder", "text_encoder_2", "unet", "vae"),
                hot_loop=("unet",),
                per_image=("text_encoder", "text_encoder_2", "vae.decoder"),
            ),
            tiny_checkpoint="gesso_sdxl.tiny:write_tiny_checkpoint",
        )
    )
