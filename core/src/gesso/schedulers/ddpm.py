"""Ancestral sampling of the discrete diffusion chain: DDPM (and the common VP machinery) and UnCLIP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config
from gesso.noise import randn_tensor

from .base import DiscreteTimeMixin, SchedulerMixin, SchedulerOutput, check_choice, threshold_sample
from .schedules import add_noise_vp, make_betas, spaced_timesteps, velocity_vp

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def predict_x0(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, abar: Any) -> torch.Tensor:
    """x0 from the network output at cumulative alpha ``abar`` (epsilon, sample or v; Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return (sample - (1 - abar) ** 0.5 * model_output) / abar**0.5
    if prediction_type == "sample":
        return model_output
    return abar**0.5 * sample - (1 - abar) ** 0.5 * model_output


class VPSchedulerMixin(DiscreteTimeMixin, SchedulerMixin):
    """Shared by schedulers parameterised by ``alphas_cumprod`` over integer training steps."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    init_noise_sigma = 1.0
    num_inference_steps: int | None = None

    def _init_alphas(self, betas: torch.Tensor) -> None:
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._store_timesteps(torch.from_numpy(np.arange(0, len(betas))[::-1].copy()))

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """These schedulers feed the sample to the model unscaled."""
        return sample

    def _clip_or_threshold(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.option("thresholding", False):
            return threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if self.option("clip_sample", False):
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise clean samples to ``timesteps`` (q(x_t | x_0))."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction training target."""
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)


class DDPMScheduler(VPSchedulerMixin):
    """Denoising diffusion probabilistic models (Ho et al. 2020, Algorithm 2), with the posterior
    variance choices of Nichol & Dhariwal 2021 (``learned_range``: eq. 15)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "variance_type", variance_type, self.VARIANCE_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
        betas = make_betas(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            rescale_betas_zero_snr, allowed=schedules,
        )  # fmt: skip
        self._init_alphas(betas)
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = variance_type

    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the inference timesteps: evenly spaced per ``timestep_spacing``, or given."""
        cfg = self.config
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is not None:
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError("timesteps must be in descending order")
            if timesteps[0] >= cfg.num_train_timesteps:
                raise ValueError(f"timesteps must start below num_train_timesteps={cfg.num_train_timesteps}")
            ts = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or timesteps")
            if num_inference_steps > cfg.num_train_timesteps:
                raise ValueError(f"num_inference_steps={num_inference_steps} exceeds {cfg.num_train_timesteps}")
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            ts = spaced_timesteps(
                type(self).__name__, cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                cfg.steps_offset,
            ).astype(np.int64)  # fmt: skip
        self._store_timesteps(torch.from_numpy(ts).to(device))

    def previous_timestep(self, timestep: Any) -> int:
        """The timestep the step lands on: the next one in the schedule, or -1 after the last."""
        t = self._timestep_value(timestep) if isinstance(timestep, torch.Tensor) else int(timestep)
        return self._previous(t)

    def _previous(self, t: int) -> int:
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        index = self._timesteps_host.index(t)
        return -1 if index == len(self._timesteps_host) - 1 else int(self._timesteps_host[index + 1])

    def _get_variance(self, t: int, predicted_variance: torch.Tensor | None = None, variance_type: str | None = None) -> torch.Tensor:
        prev_t = self._previous(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_t = 1 - abar_t / abar_prev
        # posterior variance beta~_t (Ho et al. eq. 7), floored so that its log stays finite
        variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
        kind = variance_type or self.config.variance_type
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if kind == "fixed_large":
            return beta_t
        if kind == "fixed_large_log":
            return torch.log(beta_t)
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta_t) + (1 - frac) * torch.log(variance)
        return variance

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral step x_t -> x_{t-1} through the posterior q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
        t = self._timestep_value(timestep)
        prev_t = self._previous(t)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        x0 = self._clip_or_threshold(predict_x0(self.config.prediction_type, model_output, sample, abar_t))
        # posterior mean mu~_t (Ho et al. eq. 7)
        x0_coeff = abar_prev**0.5 * beta_t / (1 - abar_t)
        xt_coeff = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            if self.variance_type == "fixed_small_log":
                prev_sample = prev_sample + self._get_variance(t, predicted_variance) * noise
            elif self.variance_type == "learned_range":
                prev_sample = prev_sample + torch.exp(0.5 * self._get_variance(t, predicted_variance)) * noise
            else:
                prev_sample = prev_sample + self._get_variance(t, predicted_variance) ** 0.5 * noise
        self._advance(timestep)
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class UnCLIPScheduler(VPSchedulerMixin):
    """The DDPM variant of unCLIP (Ramesh et al. 2022) used by the Kandinsky prior: cosine betas,
    evenly spaced timesteps from T-1 down to 0, and steps to any ``prev_timestep``."""

    _compatibles = ()

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        variance_type: str = "fixed_small_log",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        beta_schedule: str = "squaredcos_cap_v2",
    ) -> None:
        name = type(self).__name__
        check_choice(name, "beta_schedule", beta_schedule, ("squaredcos_cap_v2",))
        check_choice(name, "variance_type", variance_type, ("fixed_small_log", "learned_range"))
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "sample"))
        self._init_alphas(make_betas(name, num_train_timesteps, 0.0, 0.0, beta_schedule))
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``n`` timesteps rounded from an even grid over ``[0, T-1]``, both ends included."""
        self.num_inference_steps = num_inference_steps
        ratio = (self.config.num_train_timesteps - 1) / (num_inference_steps - 1)
        ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
        self._store_timesteps(torch.from_numpy(ts).to(device))

    def _prev_value(self, prev_timestep: Any, t: int) -> int:
        if prev_timestep is None:
            return t - 1
        if not isinstance(prev_timestep, torch.Tensor):
            return int(prev_timestep)
        index = self._step_index
        if index is not None and index + 1 < len(self._timesteps_host):
            return int(self._timesteps_host[index + 1])  # what pipelines pass: the next scheduled timestep
        return int(prev_timestep.item())

    def _get_variance(
        self,
        t: int,
        prev_timestep: int | None = None,
        predicted_variance: torch.Tensor | None = None,
        variance_type: str | None = None,
    ) -> torch.Tensor:
        prev_t = t - 1 if prev_timestep is None else prev_timestep
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta = self.betas[t] if prev_t == t - 1 else 1 - abar_t / abar_prev
        variance = (1 - abar_prev) / (1 - abar_t) * beta
        if (variance_type or self.config.variance_type) == "fixed_small_log":
            return torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))
        frac = (predicted_variance + 1) / 2
        return frac * beta.log() + (1 - frac) * variance.log()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        prev_timestep: Any = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One posterior step from ``timestep`` to ``prev_timestep`` (default ``timestep - 1``)."""
        t = self._timestep_value(timestep)
        prev_t = self._prev_value(prev_timestep, t)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type == "learned_range":
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        if prev_t == t - 1:
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = 1 - abar_t / abar_prev
            alpha = 1 - beta
        x0 = predict_x0(self.config.prediction_type, model_output, sample, abar_t)
        if self.config.clip_sample:
            x0 = torch.clamp(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        x0_coeff = abar_prev**0.5 * beta / (1 - abar_t)
        xt_coeff = alpha**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            std = self._get_variance(t, prev_t, predicted_variance)
            if self.variance_type == "learned_range":
                std = (0.5 * std).exp()
            prev_sample = prev_sample + std * noise
        self._advance(timestep)
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
