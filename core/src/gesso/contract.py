"""The objects plugins hand to the core through the hooks in :mod:`gesso.hookspecs`.

They are plain, import-light descriptions: heavy code (torch models, pipelines) is named by a
``"module:attribute"`` string and imported only when a family is used, so listing plugins stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


def load_object(target: str | Any) -> Any:
    """Import ``"package.module:attribute"``; anything else is returned as it is."""
    if not isinstance(target, str):
        return target
    module_name, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split(".") if attribute else []:
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ExecutionPolicy:
    """What a family allows to be done to its components on a GPU.

    ``float32_components`` always stay in float32; ``float32_when`` maps a component to a config key
    of that component which, when true, keeps it in float32 at run time (SDXL's VAE ``force_upcast``);
    ``offload_order`` is the order components run in (for model CPU offload); ``hot_loop`` names the
    modules called at every step of a denoising loop (the targets of fusion, compilation and CUDA
    graphs), the main denoiser first (the one conditioners such as a ControlNet run beside); ``per_image``
    names the other modules an image calls with fixed shapes (text encoders, ``"vae.decoder"``), which
    CUDA graphs replay too; ``image_decoder`` is the component that turns latents into pixels
    (the VAE; Kandinsky's MoVQ), the target of the decoder's layout, compilation and tiling.
    ``preset_members`` adds optimizations to a preset for this family only: those measured to pay
    for its models but not for every family's (Kandinsky 2.2: ``{"fast": ("cudnn_benchmark",)}``).
    """

    float32_components: tuple[str, ...] = ()
    float32_when: Mapping[str, str] = field(default_factory=dict)
    offload_order: tuple[str, ...] = ()
    hot_loop: tuple[str, ...] = ("unet",)
    per_image: tuple[str, ...] = ()
    image_decoder: str = "vae"
    preset_members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFamily:
    """A model family: how its checkpoints are recognised and which pipeline runs them.

    ``pipeline`` is the pipeline class (or ``"module:Class"``). ``pipeline_class_names`` are the
    ``_class_name`` values of ``model_index.json`` it claims; ``recognise`` may refine that with a
    score (0 = not mine; higher wins; a tie is an error). ``config_defaults`` are the family's
    run-config defaults and ``config_keys`` its extra call parameters (name -> default).
    ``tiny_checkpoint(folder)`` writes a tiny random-weight checkpoint of the family in the real
    on-disk layout (for tests: :mod:`gesso.testing` offers it as a fixture).
    """

    name: str
    pipeline: str | type
    pipeline_class_names: tuple[str, ...]
    description: str = ""
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    config_keys: Mapping[str, Any] = field(default_factory=dict)
    execution_policy: ExecutionPolicy = field(default_factory=ExecutionPolicy)
    recognise: Callable[[Mapping[str, Any]], int] | None = None
    tiny_checkpoint: str | Callable[..., Any] | None = None

    def score(self, model_index: Mapping[str, Any]) -> int:
        if self.recognise is not None:
            return int(self.recognise(model_index))
        return 1 if model_index.get("_class_name") in self.pipeline_class_names else 0

    def pipeline_class(self) -> type:
        return load_object(self.pipeline)


@dataclass(frozen=True)
class Component:
    """The implementation of a ``["library", "ClassName"]`` pair of ``model_index.json``."""

    library: str
    class_name: str
    target: str | type

    @property
    def key(self) -> tuple[str, str]:
        return (self.library, self.class_name)

    def load_class(self) -> type:
        return load_object(self.target)


@dataclass(frozen=True)
class Scheduler:
    """A scheduler class and its short names (short name -> config overrides)."""

    target: str | type
    class_name: str
    short_names: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def load_class(self) -> type:
        return load_object(self.target)


@dataclass(frozen=True)
class ConditionerSpec:
    """Extra conditioning applied to other families' pipelines (ControlNet is the first).

    ``pipeline_argument`` is the ``from_pretrained`` keyword that attaches it (``controlnet=...``);
    ``families`` are the families it applies to; ``factory(value, pipeline)`` returns the
    :class:`gesso.conditioning.Conditioner` attached to the pipeline; ``config_keys`` are the run-config
    keys it adds (name -> default).
    """

    name: str
    pipeline_argument: str
    families: tuple[str, ...]
    factory: str | Callable[..., Any]
    config_keys: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def load_factory(self) -> Callable[..., Any]:
        return load_object(self.factory)


@dataclass(frozen=True)
class OptimizationSpec:
    """A GPU optimization: ``apply(pipeline, policy, **options)`` changes a loaded pipeline in place.

    ``devices`` lists the device types it works on (``"cuda"``, ``"cpu"``); ``families`` the
    families it supports (empty = all); ``order`` sorts composition (precision before compile).
    ``options`` are the keyword options ``apply`` accepts (name -> default), which a run config sets
    under ``optimization_options.<name>``. ``presets`` names the presets it joins (``("fast",)``),
    so that a plugin's optimization is part of ``fast`` wherever the plugin is installed.
    """

    name: str
    apply: str | Callable[..., Any]
    description: str = ""
    devices: tuple[str, ...] = ("cuda",)
    families: tuple[str, ...] = ()
    order: int = 50
    options: Mapping[str, Any] = field(default_factory=dict)
    presets: tuple[str, ...] = ()

    def load_apply(self) -> Callable[..., Any]:
        return load_object(self.apply)

    def supports(self, family: str, device: str) -> str | None:
        """None when supported, else the reason it is not."""
        if self.families and family not in self.families:
            return f"optimization {self.name!r} supports families {', '.join(self.families)}, not {family!r}"
        if device not in self.devices:
            return f"optimization {self.name!r} runs on {', '.join(self.devices)}, not {device!r}"
        return None
