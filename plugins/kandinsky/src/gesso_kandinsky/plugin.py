"""Registers the Kandinsky 2.2 family and its components with gesso."""

from __future__ import annotations

from collections.abc import Callable

from gesso import hookimpl
from gesso.contract import Component, ExecutionPolicy, ModelFamily


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    register(
        ModelFamily(
            name="kandinsky",
            pipeline="gesso_kandinsky.pipeline:KandinskyV22CombinedPipeline",
            pipeline_class_names=("KandinskyV22CombinedPipeline", "KandinskyV22Pipeline"),
            description="Kandinsky 2.2 (unCLIP prior -> image-conditioned UNet -> MoVQ, 512x512)",
            config_defaults="gesso_kandinsky:defaults.yaml",
            config_keys={
                "prior_guidance_scale": 4.0,
                "prior_num_inference_steps": 25,
                "prior": None,
            },
            execution_policy=ExecutionPolicy(
                offload_order=("prior_text_encoder", "prior_image_encoder", "prior_prior", "unet", "movq"),
                hot_loop=("unet", "prior_prior"),  # the decoder's steps, then the prior's own 25
                per_image=("prior_text_encoder", "prior_image_encoder", "movq.decoder"),
                image_decoder="movq",
                preset_members={"fast": ("cudnn_benchmark",)},  # its convolutions: benchmarks/NOTES.md, fifteenth session
            ),
            tiny_checkpoint="gesso_kandinsky.tiny:write_tiny_checkpoint",
        )
    )


@hookimpl
def register_components(register: Callable[[Component], None]) -> None:
    register(Component("diffusers", "PriorTransformer", "gesso_kandinsky.prior_transformer:PriorTransformer"))
    register(Component("diffusers", "VQModel", "gesso_kandinsky.movq:VQModel"))
