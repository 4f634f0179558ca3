"""Euler's method on a polyexponential noise schedule (k-diffusion's ``get_sigmas_polyexponential``).

The sampler works in Karras et al.'s sigma parameterisation, x = x0 + sigma * eps: the model sees
x / sqrt(sigma^2 + 1) and predicts eps; one Euler step of the probability-flow ODE goes from sigma
to the next sigma along d = (x - x0) / sigma. The schedule is

    sigma_i = exp(ramp_i^rho * (log sigma_max - log sigma_min) + log sigma_min),  ramp = linspace(1, 0, n)

then a final 0: rho = 1 spaces the sigmas evenly in log-sigma, rho > 1 spends more steps at low noise.
Each sigma's timestep (what the UNet is conditioned on) is found by interpolating the training
log-sigmas. The keys of a checkpoint's scheduler config (betas, prediction type) carry over, so
``scheduler=euler_polyexp`` works on any epsilon- or v-prediction checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gesso.configuration import register_to_config
from gesso.schedulers import SchedulerMixin, SchedulerOutput


class EulerPolyExponentialScheduler(SchedulerMixin):
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        rho: float = 1.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"{type(self).__name__}: beta_schedule={beta_schedule!r} is not supported; choose 'linear' or 'scaled_linear'")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{type(self).__name__}: prediction_type={prediction_type!r} is not supported; choose 'epsilon' or 'v_prediction'"
            )
        if rho <= 0:
            raise ValueError(f"{type(self).__name__}: rho must be positive, got {rho}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        #: Training noise levels, ascending in t.
        self.train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        self.set_timesteps(num_train_timesteps)

    # -- the schedule ----------------------------------------------------------------------------
    def sigma_schedule(self, n: int) -> np.ndarray:
        """``n`` sigmas from sigma_max down to sigma_min, polyexponentially spaced."""
        lo = self.config.sigma_min if self.config.sigma_min is not None else float(self.train_sigmas[0])
        hi = self.config.sigma_max if self.config.sigma_max is not None else float(self.train_sigmas[-1])
        ramp = np.linspace(1, 0, n) ** self.config.rho
        return np.exp(ramp * (np.log(hi) - np.log(lo)) + np.log(lo))

    def sigma_to_t(self, sigmas: np.ndarray) -> np.ndarray:
        """The fractional training timestep of each sigma (linear in log-sigma)."""
        log_train = np.log(self.train_sigmas.astype(np.float64))
        return np.interp(np.log(sigmas), log_train, np.arange(len(log_train), dtype=np.float64))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        sigmas = self.sigma_schedule(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(self.sigma_to_t(sigmas).astype(np.float32)).to(device)
        self._timesteps_host = self.timesteps.cpu().tolist()
        self._step_index = None

    @property
    def init_noise_sigma(self) -> float:
        """Initial noise is drawn at unit variance and scaled to sigma_max."""
        return float(self.sigmas.max())

    # -- the steps -------------------------------------------------------------------------------
    def _index(self, timestep: Any) -> int:
        """The position in the schedule: found on the first call, then counted."""
        if self._step_index is None:
            value = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
            self._step_index = min(range(len(self._timesteps_host)), key=lambda i: abs(self._timesteps_host[i] - value))
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        sigma = self.sigmas[self._index(timestep)]
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        i = self._index(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v-prediction, for the scaled input
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - x0) / sigma
        prev_sample = (sample + derivative * (sigma_next - sigma)).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
