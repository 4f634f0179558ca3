"""Diffusion schedulers under the reference class names and ``scheduler_config.json`` vocabulary.

``SHORT_NAMES`` maps the names users know (``euler_a``, ``dpmpp_2m_karras``...) to a class and the
config overrides that make it that sampler; ``scheduler_from_name`` builds one on top of a
checkpoint's own scheduler config, keeping its betas, spacing, offset and prediction type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gesso.noise import randn_tensor
from gesso.scheduler_names import SHORT_NAMES

from .base import LCMSchedulerOutput, SchedulerMixin, SchedulerOutput
from .ddim import DDIMScheduler, LCMScheduler, PNDMScheduler
from .ddpm import DDPMScheduler, UnCLIPScheduler
from .deis import DEISMultistepScheduler
from .dpm_singlestep import DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .heun import HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .kdiffusion import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler
from .unipc import UniPCMultistepScheduler

BUILTIN_SCHEDULERS: tuple[type[SchedulerMixin], ...] = (
    PNDMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
    DEISMultistepScheduler,
    KDPM2DiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LCMScheduler,
    UnCLIPScheduler,
)


def scheduler_from_name(name: str, base_config: Mapping[str, Any], registry: Mapping[str, type] | None = None) -> SchedulerMixin:
    """Build the scheduler ``name`` (a short name or a class name) from a checkpoint's scheduler
    config, as ``Class.from_config(base_config, **overrides)``: the betas, ``timestep_spacing``,
    ``steps_offset`` and ``prediction_type`` of ``base_config`` carry over.

    ``registry`` maps class names to classes (default: the built-in schedulers).
    """
    classes = dict(registry) if registry is not None else {cls.__name__: cls for cls in BUILTIN_SCHEDULERS}
    if name in SHORT_NAMES:
        class_name, overrides = SHORT_NAMES[name]
    elif name in classes:
        class_name, overrides = name, {}
    else:
        known = ", ".join(sorted(SHORT_NAMES))
        raise ValueError(f"unknown scheduler name {name!r}; known names: {known} (or a scheduler class name)")
    if class_name not in classes:
        raise ValueError(f"scheduler {name!r} needs class {class_name}, which is not registered")
    return classes[class_name].from_config(base_config, **overrides)


__all__ = [
    "BUILTIN_SCHEDULERS",
    "SHORT_NAMES",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LCMSchedulerOutput",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SchedulerMixin",
    "SchedulerOutput",
    "UnCLIPScheduler",
    "UniPCMultistepScheduler",
    "randn_tensor",
    "scheduler_from_name",
]
