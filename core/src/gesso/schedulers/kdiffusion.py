"""Samplers in Karras et al.'s sigma parameterisation (x = x0 + sigma * eps): Euler, Euler
ancestral and LMS, plus the base class the second-order ones in ``heun.py`` share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config
from gesso.noise import randn_tensor

from .base import SchedulerMixin, SchedulerOutput, check_choice
from .schedules import (
    exponential_sigmas,
    interp_sigmas,
    karras_sigmas,
    make_betas,
    sigma_to_t,
    spaced_timesteps,
    training_sigmas,
    velocity_vp,
)


def sigma_x0(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, sigma: Any) -> torch.Tensor:
    """x0 from the network output at noise level ``sigma`` (input not yet scaled by 1/sqrt(1+sigma^2))."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


def sigma_family(owner: str, use_karras: bool, use_exponential: bool, use_beta: bool) -> str:
    """Which sigma spacing the config asks for: 'karras', 'exponential' or 'interp' (the default)."""
    if sum(map(bool, (use_karras, use_exponential, use_beta))) > 1:
        raise ValueError(f"{owner}: use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas exclude each other")
    if use_beta:
        raise ValueError(f"{owner}: use_beta_sigmas=True is not supported by gesso")
    return "karras" if use_karras else "exponential" if use_exponential else "interp"


def inference_sigmas(
    family: str,
    train_sigmas: np.ndarray,
    timesteps: np.ndarray,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmas at the inference timesteps, re-spaced per ``family``; timesteps follow the sigmas."""
    sigmas = interp_sigmas(timesteps, train_sigmas)
    if family == "interp":
        return sigmas, timesteps
    lo = sigma_min if sigma_min is not None else sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else sigmas[0].item()
    sigmas = karras_sigmas(lo, hi, n) if family == "karras" else exponential_sigmas(lo, hi, n)
    return sigmas, sigma_to_t(sigmas, np.log(train_sigmas))


class SigmaSchedulerMixin(SchedulerMixin):
    """Betas, training sigmas, input scaling and ``add_noise`` for the k-diffusion samplers."""

    sigmas: torch.Tensor
    num_inference_steps: int | None = None

    def _init_betas(self, betas: torch.Tensor, zero_snr: bool = False) -> None:
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if zero_snr:  # keep the terminal sigma finite (Lin et al. 2023 sec. 3.1 leaves it infinite)
            self.alphas_cumprod[-1] = 2**-24

    def _sigma_family(self) -> str:
        cfg = self.config
        return sigma_family(
            type(self).__name__, cfg.use_karras_sigmas, self.option("use_exponential_sigmas"), self.option("use_beta_sigmas")
        )

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.to("cpu")
        self._sigmas_host = self.sigmas.tolist()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for leading spacing."""
        top = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return top
        return (top**2 + 1) ** 0.5

    def _input_sigma(self, index: int) -> torch.Tensor:
        return self.sigmas[index]

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """Divide by sqrt(sigma^2 + 1) so the model sees a unit-variance input (Karras et al. table 1)."""
        index = self._ensure_step_index(timestep)
        self.is_scale_input_called = True
        return sample / (self._input_sigma(index) ** 2 + 1) ** 0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x0 + sigma(t) * noise, at each sample's timestep."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._noise_indices(timesteps)].flatten()
        return original_samples + noise * sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))

    def _spaced(self, n: int, num_train_timesteps: int | None = None) -> np.ndarray:
        cfg = self.config
        return spaced_timesteps(
            type(self).__name__, cfg.timestep_spacing, n, num_train_timesteps or cfg.num_train_timesteps,
            cfg.steps_offset, fractional_linspace=True,
        ).astype(np.float32)  # fmt: skip


class EulerDiscreteScheduler(SigmaSchedulerMixin):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with optional churn)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        check_choice(name, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice(name, "timestep_type", timestep_type, ("discrete",))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._sigma_family()
        self._init_betas(
            make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr),
            zero_snr=rescale_betas_zero_snr,
        )  # fmt: skip
        sigmas = torch.from_numpy(training_sigmas(self.alphas_cumprod)[::-1].copy())
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self._store_timesteps(torch.from_numpy(ts).to(torch.float32))
        self._set_sigmas(torch.cat([sigmas, torch.zeros(1)]))
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Spaced (or given) timesteps and their sigmas, with a final sigma of 0 or sigma_min."""
        cfg = self.config
        family = self._sigma_family()
        given = [x is not None for x in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and family != "interp":
            raise ValueError(f"timesteps cannot be given with use_{family}_sigmas=True")
        train = training_sigmas(self.alphas_cumprod)
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps
        if sigmas is not None:
            sig = np.array(sigmas).astype(np.float32)
            ts = sigma_to_t(sig[:-1], np.log(train))
        else:
            ts = np.array(timesteps).astype(np.float32) if timesteps is not None else self._spaced(num_inference_steps)
            if cfg.interpolation_type == "log_linear":
                sig = torch.linspace(np.log(train[-1]), np.log(train[0]), num_inference_steps + 1).exp().numpy()
                if family != "interp":
                    lo = cfg.sigma_min if cfg.sigma_min is not None else sig[-1].item()
                    hi = cfg.sigma_max if cfg.sigma_max is not None else sig[0].item()
                    sig = (
                        karras_sigmas(lo, hi, num_inference_steps)
                        if family == "karras"
                        else (exponential_sigmas(lo, hi, num_inference_steps))
                    )
                    ts = sigma_to_t(sig, np.log(train))
            else:
                sig, ts = inference_sigmas(family, train, ts, num_inference_steps, cfg.sigma_min, cfg.sigma_max)
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else 0
            sig = np.concatenate([sig, [last]]).astype(np.float32)
        self._set_sigmas(torch.from_numpy(sig).to(torch.float32))
        self._store_timesteps(torch.from_numpy(np.asarray(ts).astype(np.float32)).to(device=device))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_next = x + (sigma_next - sigma_hat) * (x - x0) / sigma_hat, sigma_hat = sigma * (1 + gamma)."""
        i = self._ensure_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        in_range = s_tmin <= self._sigmas_host[i] <= s_tmax
        gamma = min(s_churn / (len(self._sigmas_host) - 1), 2**0.5 - 1) if in_range else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:
            x0 = sigma_x0("sample" if kind == "original_sample" else kind, model_output, sample, sigma)
        derivative = (sample - x0) / sigma_hat
        prev_sample = (sample + derivative * (self.sigmas[i + 1] - sigma_hat)).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target at the given (scheduled) timesteps."""
        indices = torch.tensor([self.index_for_timestep(t) for t in timesteps.flatten().cpu().tolist()])
        return velocity_vp(self.alphas_cumprod, sample, noise, indices)


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Euler ancestral sampling (k-diffusion ``sample_euler_ancestral``): an Euler step down to
    sigma_down, then fresh noise of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._init_betas(
            make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr),
            zero_snr=rescale_betas_zero_snr,
        )  # fmt: skip
        sigmas = np.concatenate([training_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self._set_sigmas(torch.from_numpy(sigmas))
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self._store_timesteps(torch.from_numpy(ts))
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Spaced timesteps and their interpolated sigmas, ending at 0."""
        self.num_inference_steps = num_inference_steps
        ts = self._spaced(num_inference_steps)
        sig = interp_sigmas(ts, training_sigmas(self.alphas_cumprod))
        self._set_sigmas(torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32)))
        self._store_timesteps(torch.from_numpy(ts).to(device=device))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral Euler step (eta = 1)."""
        i = self._ensure_step_index(timestep)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)
        x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev_sample = sample + (sample - x0) / sigma * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(8)


def integrate(f: Any, a: float, b: float) -> float:
    """8-point Gauss-Legendre quadrature of ``f`` over ``[a, b]``: exact for polynomials up to degree 15."""
    half, mid = (b - a) / 2, (a + b) / 2
    return float(sum(w * f(mid + half * x) for x, w in zip(_GAUSS_NODES, _GAUSS_WEIGHTS)) * half)


def lms_coefficient(sigmas: Sequence[float], order: int, i: int, j: int) -> float:
    """Weight of the derivative at ``sigmas[i - j]`` in a linear multistep step from ``sigmas[i]``
    to ``sigmas[i + 1]``: the integral of its Lagrange basis polynomial (k-diffusion ``sample_lms``)."""

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return integrate(basis, sigmas[i], sigmas[i + 1])


class LMSDiscreteScheduler(SigmaSchedulerMixin):
    """Linear multistep (Adams-Bashforth in sigma) of up to 4th order (k-diffusion ``sample_lms``)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
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
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._sigma_family()
        self._init_betas(make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas))
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps)
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Spaced timesteps and their sigmas (interpolated, Karras or exponential), ending at 0."""
        self.num_inference_steps = num_inference_steps
        ts = self._spaced(num_inference_steps)
        sig, ts = inference_sigmas(self._sigma_family(), training_sigmas(self.alphas_cumprod), ts, num_inference_steps)
        self._set_sigmas(torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32)))
        self._store_timesteps(torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.float32))
        self.derivatives: list[torch.Tensor] = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """See :func:`lms_coefficient`."""
        return lms_coefficient(self._sigmas_host, order, t, current_order)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_next = x + sum_j c_j d_{i-j}, the c_j integrating the Lagrange basis over [sigma_i, sigma_{i+1}]."""
        i = self._ensure_step_index(timestep)
        sigma = self.sigmas[i]
        x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(i + 1, order)
        coeffs = [self.get_lms_coefficient(order, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
