"""Registers the ControlNet model classes and the ``controlnet=`` conditioner with gesso."""

from __future__ import annotations

from collections.abc import Callable

from gesso import hookimpl
from gesso.contract import Component, ConditionerSpec, OptimizationSpec

#: Run-config keys the conditioner adds (name -> default), the reference's call defaults.
CONFIG_KEYS = {
    "image": None,
    "controlnet_conditioning_scale": 1.0,
    "guess_mode": False,
    "control_guidance_start": 0.0,
    "control_guidance_end": 1.0,
}


@hookimpl
def register_components(register: Callable[[Component], None]) -> None:
    register(Component("diffusers", "ControlNetModel", "gesso_controlnet.model:ControlNetModel"))
    register(Component("diffusers", "MultiControlNetModel", "gesso_controlnet.model:MultiControlNetModel"))


@hookimpl
def register_conditioners(register: Callable[[ConditionerSpec], None]) -> None:
    register(
        ConditionerSpec(
            name="controlnet",
            pipeline_argument="controlnet",
            families=("sd15", "sdxl"),
            factory="gesso_controlnet.conditioner:attach",
            config_keys=CONFIG_KEYS,
            description="ControlNet: steer the UNet with a control image (pose, edges, depth ...); several nets sum",
        )
    )


@hookimpl
def register_optimizations(register: Callable[[OptimizationSpec], None]) -> None:
    register(
        OptimizationSpec(
            name="control_embedding_once",
            apply="gesso_controlnet.optimize:control_embedding_once",
            description="each ControlNet's control image embedded once per image, not at every step",
            devices=("cuda", "cpu"),
            families=("sd15", "sdxl"),
            order=85,  # around cuda_graph's replay, as cross_kv_once: it runs before the step, outside the graph
            presets=("fast",),
        )
    )
    register(
        OptimizationSpec(
            name="controlnet_side_stream",
            apply="gesso_controlnet.side_stream:controlnet_side_stream",
            description="the ControlNet on a second CUDA stream, alongside the UNet's down blocks and mid block (one graph for both under cuda_graph)",
            devices=("cuda",),
            families=("sd15", "sdxl"),
            order=75,  # inside cuda_graph's capture of the UNet's call, which then holds the net's kernels too
            presets=("fast",),
        )
    )
