"""The scheduler base class, step outputs and the step-index bookkeeping every scheduler shares.

A scheduler turns a model's prediction at one noise level into the sample at the next one. The
classes in this package use the reference vocabulary (``scheduler_config.json`` keys and class
names) so that published checkpoints load unchanged.

GPU note: nothing here reads a device tensor back to the host inside the denoising loop. The
position in the schedule is a Python ``int`` (``step_index``), resolved once, on the first step,
from a host copy of the timesteps; per-step scalars are 0-d CPU tensors, which PyTorch passes to
device kernels as plain arguments.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from gesso.configuration import ConfigMixin

S = TypeVar("S", bound="SchedulerMixin")

#: The reference's family of interchangeable noise-prediction schedulers (its ``compatibles``).
KARRAS_DIFFUSION_SCHEDULERS: tuple[str, ...] = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
)


@dataclass
class SchedulerOutput:
    """What ``step`` returns: the less noisy sample and, where the method has one, its x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class LCMSchedulerOutput:
    """LCM's step output: the next sample and the consistency function's denoised estimate."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def check_choice(owner: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise a ValueError naming ``key`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{owner}: {key}={value!r} is not supported; choose one of {choices}")


def broadcast_to_sample(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Reshape a per-batch vector so it broadcasts against ``sample`` (trailing singleton dims)."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (sample.ndim - 1)))


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", sec. 2.3).

    Per batch element, ``s`` is the ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``;
    x0 is clipped to ``[-s, s]`` and divided by ``s``.
    """
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()
    flat = sample.reshape(batch, channels * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def _python_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return timestep.item()  # only on a first step, never inside the loop
    return float(timestep)


class SchedulerMixin(ConfigMixin):
    """Loading, saving, ``compatibles`` and the step index for every scheduler in gesso."""

    config_name: ClassVar[str] = "scheduler_config.json"
    _compatibles: ClassVar[tuple[str, ...]] = KARRAS_DIFFUSION_SCHEDULERS
    order: ClassVar[int] = 1
    #: When the first timestep is not in the schedule: False raises, True starts at the last step.
    _missing_timestep_is_last: ClassVar[bool] = False

    _step_index: int | None = None
    _begin_index: int | None = None
    _timesteps_host: list[float] = []

    # -- persistence -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls: type[S], folder: str | Path, subfolder: str | None = None, **overrides: Any) -> S:
        """Build from ``folder/[subfolder/]scheduler_config.json``, overriding some keys."""
        return cls.from_config(cls.load_config(folder, subfolder), **overrides)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``scheduler_config.json`` into ``folder``; returns its path."""
        return self.save_config(folder)

    @property
    def compatibles(self) -> list[type[SchedulerMixin]]:
        """The scheduler classes that can replace this one on the same model (``from_config``)."""
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls) -> list[type[SchedulerMixin]]:
        package = importlib.import_module("gesso.schedulers")
        names = sorted({cls.__name__, *cls._compatibles})
        return [getattr(package, name) for name in names if hasattr(package, name)]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- step index --------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Position of the current step in ``timesteps`` (a Python int; None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, when a pipeline set it with ``set_begin_index`` (img2img, inpainting)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next denoising loop at ``timesteps[begin_index]``."""
        self._begin_index = begin_index

    def _store_timesteps(self, timesteps: torch.Tensor) -> None:
        """Keep ``timesteps`` (wherever the caller wants it) and a host copy for index look-ups."""
        self.timesteps = timesteps
        self._timesteps_host = timesteps.detach().cpu().tolist()
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in the schedule; the second match when it appears more than once.

        (A repeated first timestep happens for second-order samplers entered mid-schedule, where the
        second copy is where the step actually starts.)
        """
        if schedule_timesteps is None:
            host = self._timesteps_host
        else:
            host = schedule_timesteps.detach().cpu().tolist()
        value = _python_value(timestep)
        matches = [i for i, t in enumerate(host) if t == value]
        if not matches:
            if self._missing_timestep_is_last:
                return len(host) - 1
            raise ValueError(f"{type(self).__name__}: timestep {value} is not in the schedule")
        return matches[1] if len(matches) > 1 else matches[0]

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            self._step_index = self.index_for_timestep(timestep)

    def _ensure_step_index(self, timestep: Any) -> int:
        if self._step_index is None:
            self._init_step_index(timestep)
        assert self._step_index is not None
        return self._step_index

    def _noise_indices(self, timesteps: torch.Tensor) -> list[int]:
        """Step indices for ``add_noise``: the timesteps' own positions, or the current/begin step."""
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.flatten().cpu().tolist()]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]


class DiscreteTimeMixin:
    """For schedulers indexed by the integer training timestep (DDPM, DDIM, PNDM, LCM, UnCLIP).

    A Python-number timestep is used as given. A tensor timestep is read once, on the first step,
    and the following steps walk the host copy of ``timesteps`` instead of reading the device.
    """

    _step_index: int | None
    _timesteps_host: list[float]

    def _timestep_value(self, timestep: Any) -> int:
        if not isinstance(timestep, torch.Tensor):
            return int(timestep)
        index = self._step_index
        if index is not None and index < len(self._timesteps_host):
            return int(self._timesteps_host[index])
        value = int(timestep.item())  # first step (or a timestep outside the schedule)
        if value in self._timesteps_host:
            self._step_index = self._timesteps_host.index(value)
        return value

    def _advance(self, timestep: Any) -> None:
        if isinstance(timestep, torch.Tensor) and self._step_index is not None:
            self._step_index += 1
