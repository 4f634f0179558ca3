"""The core's own plugin: shared components, the built-in schedulers and optimizations.

It registers through the same hooks as any installed plugin, so third-party packages can do
everything it does. Everything is named by ``"module:attribute"`` and imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable

from gesso.contract import Component, OptimizationSpec, Scheduler
from gesso.hookspecs import hookimpl

#: ``model_index.json`` pairs served by transformers itself.
TRANSFORMERS_CLASSES = (
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModelWithProjection",
    "CLIPTokenizer",
    "CLIPTokenizerFast",
    "CLIPImageProcessor",
    "CLIPImageProcessorFast",
    "CLIPImageProcessorPil",
)

SCHEDULER_CLASSES = (
    "PNDMScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LCMScheduler",
    "UnCLIPScheduler",
)


@hookimpl
def register_components(register: Callable[[Component], None]) -> None:
    register(Component("diffusers", "UNet2DConditionModel", "gesso.nn:UNet2DConditionModel"))
    register(Component("diffusers", "AutoencoderKL", "gesso.nn:AutoencoderKL"))
    for name in TRANSFORMERS_CLASSES:
        register(Component("transformers", name, f"transformers:{name}"))
    for name in SCHEDULER_CLASSES:
        register(Component("diffusers", name, f"gesso.schedulers:{name}"))


@hookimpl
def register_schedulers(register: Callable[[Scheduler], None]) -> None:
    from gesso.schedulers import SHORT_NAMES

    by_class: dict[str, dict[str, dict]] = {name: {} for name in SCHEDULER_CLASSES}
    for short, (class_name, overrides) in SHORT_NAMES.items():
        by_class[class_name][short] = dict(overrides)
    for name in SCHEDULER_CLASSES:
        register(Scheduler(target=f"gesso.schedulers:{name}", class_name=name, short_names=by_class[name]))


@hookimpl
def register_optimizations(register: Callable[[OptimizationSpec], None]) -> None:
    register(
        OptimizationSpec(
            name="channels_last",
            apply="gesso.optimize:channels_last",
            description="NHWC memory format for the UNet and VAE convolutions",
            devices=("cuda", "cpu"),
            order=20,
        )
    )
    register(
        OptimizationSpec(
            name="compile",
            apply="gesso.optimize:compile_hot_loop",
            description="torch.compile of the hot-loop modules (UNet, ControlNet)",
            devices=("cuda", "cpu"),
            order=80,
        )
    )
