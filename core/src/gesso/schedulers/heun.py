"""Second-order k-diffusion samplers, each taking two model calls per step: Heun, DPM-Solver-2
(``KDPM2``) and its ancestral variant. Their ``timesteps`` list every model call, so a step's
first and second stage appear as consecutive entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config
from gesso.noise import randn_tensor

from .base import SchedulerOutput, check_choice
from .kdiffusion import SigmaSchedulerMixin, inference_sigmas, sigma_x0
from .schedules import make_betas, sigma_to_t, training_sigmas


def repeat_inner(x: torch.Tensor) -> torch.Tensor:
    """[a, b, c, d] -> [a, b, b, c, c, d]: the first and last once, every inner value twice."""
    return torch.cat([x[:1], x[1:-1].repeat_interleave(2), x[-1:]])


def repeat_tail(x: torch.Tensor) -> torch.Tensor:
    """[a, b, c] -> [a, b, b, c, c, c]: every value after the first twice, then the last once more."""
    return torch.cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])


class _TwoStageMixin(SigmaSchedulerMixin):
    order = 2

    def _configure(self, name: str, prediction_type: str, timestep_spacing: str) -> None:
        check_choice(name, "prediction_type", prediction_type, self.PREDICTIONS)
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._sigma_family()

    PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction")

    def _base_schedule(self, n: int, num_train_timesteps: int | None, round_karras: bool) -> tuple[np.ndarray, np.ndarray]:
        """Sigmas (with a final 0) and timesteps, one per step."""
        family = self._sigma_family()
        ts = self._spaced(n, num_train_timesteps)
        sig, ts = inference_sigmas(family, training_sigmas(self.alphas_cumprod), ts, n)
        if family == "karras" and round_karras:
            ts = ts.round()
        return np.concatenate([sig, [0.0]]).astype(np.float32), ts


class HeunDiscreteScheduler(_TwoStageMixin):
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""

    PREDICTIONS = ("epsilon", "v_prediction", "sample")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        name = type(self).__name__
        self._configure(name, prediction_type, timestep_spacing)
        allowed = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
        betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, allowed=allowed)
        self._init_betas(betas)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Per step sigma_i twice (Euler stage, then correction), timesteps likewise."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if self._sigma_family() != "interp":
                raise ValueError("timesteps cannot be given with use_karras_sigmas/use_exponential_sigmas")
            n = len(timesteps)
            ts = np.array(timesteps, dtype=np.float32)
            sig = np.interp(ts, np.arange(len(self.alphas_cumprod)), training_sigmas(self.alphas_cumprod))
            sig = np.concatenate([sig, [0.0]]).astype(np.float32)
        else:
            n = num_inference_steps
            sig, ts = self._base_schedule(n, num_train_timesteps, round_karras=False)
        self.num_inference_steps = n
        self._set_sigmas(repeat_inner(torch.from_numpy(sig)))
        ts = torch.from_numpy(np.asarray(ts))
        self.prev_derivative: torch.Tensor | None = None
        self.dt: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self._store_timesteps(torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(device=device, dtype=torch.float32))

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """First call: an Euler step to sigma_next. Second call: redo it with the averaged slope."""
        i = self._ensure_step_index(timestep)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma if first else sigma_next)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = sample + derivative * dt
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class KDPM2DiscreteScheduler(_TwoStageMixin):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r = 1/2), as k-diffusion ``sample_dpm_2``:
    the midpoint is the geometric mean of sigma_i and sigma_{i+1}."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        name = type(self).__name__
        self._configure(name, prediction_type, timestep_spacing)
        self._init_betas(make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas))
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def _midpoints(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """Stage timesteps interleave the midpoint's timestep with the next step's."""
        self.num_inference_steps = num_inference_steps
        sig, ts = self._base_schedule(num_inference_steps, num_train_timesteps, round_karras=True)
        sigmas = torch.from_numpy(sig)
        mid = self._midpoints(sigmas)
        self._set_sigmas(repeat_tail(sigmas))
        self.sigmas_interpol = repeat_tail(mid)
        log_train = np.log(training_sigmas(self.alphas_cumprod))
        self.log_sigmas = torch.from_numpy(log_train).to(device)
        ts = torch.from_numpy(np.asarray(ts))
        mid_ts = torch.from_numpy(sigma_to_t(mid.numpy(), log_train)).to(dtype=ts.dtype)
        self._interleave(ts, mid_ts[1:-1], device)
        self.sample: torch.Tensor | None = None

    def _interleave(self, ts: torch.Tensor, mid_ts: torch.Tensor, device: Any) -> None:
        pairs = torch.stack((mid_ts[:, None], ts[1:, None]), dim=-1).flatten()
        self._store_timesteps(torch.cat([ts[:1], pairs]).to(device))

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def _input_sigma(self, index: int) -> torch.Tensor:
        return self.sigmas[index] if self.state_in_first_order else self.sigmas_interpol[index]

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint. Second call: from x_i with the midpoint's slope."""
        i = self._ensure_step_index(timestep)
        if self.state_in_first_order:
            sigma, mid = self.sigmas[i], self.sigmas_interpol[i + 1]
            x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
            prev_sample = sample + (sample - x0) / sigma * (mid - sigma)
            self.sample = sample
        else:
            sigma, mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
            x0 = sigma_x0(self.config.prediction_type, model_output, sample, mid)
            prev_sample = self.sample + (sample - x0) / mid * (sigma_next - sigma)
            self.sample = None
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """Ancestral DPM-Solver-2 (k-diffusion ``sample_dpm_2_ancestral``): the deterministic part
    aims at sigma_down, then noise of size sigma_up is added."""

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """As KDPM2, with the midpoint between sigma_i and sigma_down."""
        self.num_inference_steps = num_inference_steps
        sig, ts = self._base_schedule(num_inference_steps, num_train_timesteps, round_karras=True)
        sigmas = torch.from_numpy(sig)
        sigmas_next = sigmas.roll(-1)
        sigmas_next[-1] = 0.0
        sigmas_up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
        sigmas_down = (sigmas_next**2 - sigmas_up**2) ** 0.5
        sigmas_down[-1] = 0.0
        mid = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        mid[-2:] = 0.0
        self._set_sigmas(repeat_tail(sigmas))
        self.sigmas_interpol = repeat_tail(mid)
        self.sigmas_up = repeat_tail(sigmas_up)
        self.sigmas_down = repeat_tail(sigmas_down)
        log_train = np.log(training_sigmas(self.alphas_cumprod))
        self.log_sigmas = torch.from_numpy(log_train).to(device)
        ts = torch.from_numpy(np.asarray(ts))
        mid_ts = torch.from_numpy(sigma_to_t(mid.numpy(), log_train)).to(dtype=ts.dtype)
        self._interleave(ts, mid_ts[:-2], device)
        self.sample = None

    def _input_sigma(self, index: int) -> torch.Tensor:
        return self.sigmas[index] if self.state_in_first_order else self.sigmas_interpol[index - 1]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint. Second: to sigma_down with its slope, plus sigma_up noise."""
        i = self._ensure_step_index(timestep)
        if self.state_in_first_order:
            sigma, mid = self.sigmas[i], self.sigmas_interpol[i]
            x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
            prev_sample = sample + (sample - x0) / sigma * (mid - sigma)
            self.sample = sample
        else:
            sigma, mid = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            sigma_up, sigma_down = self.sigmas_up[i - 1], self.sigmas_down[i - 1]
            x0 = sigma_x0(self.config.prediction_type, model_output, sample, mid)
            prev_sample = self.sample + (sample - x0) / mid * (sigma_down - sigma)
            self.sample = None
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
