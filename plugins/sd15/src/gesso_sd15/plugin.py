"""Registers the sd15 family and its safety checker with gesso."""

from __future__ import annotations

from collections.abc import Callable

from gesso import hookimpl
from gesso.contract import Component, ExecutionPolicy, ModelFamily


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    register(
        ModelFamily(
            name="sd15",
            pipeline="gesso_sd15.pipeline:StableDiffusionPipeline",
            pipeline_class_names=("StableDiffusionPipeline",),
            description="Stable Diffusion 1.x (512x512, one CLIP text encoder)",
            config_defaults="gesso_sd15:defaults.yaml",
            execution_policy=ExecutionPolicy(
                offload_order=("text_encoder", "unet", "vae", "safety_checker"),
                hot_loop=("unet",),
                per_image=("text_encoder", "vae.decoder"),
            ),
            tiny_checkpoint="gesso_sd15.tiny:write_tiny_checkpoint",
        )
    )


@hookimpl
def register_components(register: Callable[[Component], None]) -> None:
    register(Component("stable_diffusion", "StableDiffusionSafetyChecker", "gesso_sd15.safety_checker:StableDiffusionSafetyChecker"))
