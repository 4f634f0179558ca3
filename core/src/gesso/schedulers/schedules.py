"""Noise schedules: betas, timestep spacings and sigma sequences, each written once and shared.

Every function returns the same float32/float64 values as the reference so that timesteps and
sigmas match it bit for bit (or to float32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .base import check_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999, kind: str = "cosine") -> torch.Tensor:
    """Betas from a continuous alpha-bar curve: ``beta_i = 1 - abar((i+1)/T) / abar(i/T)``, capped.

    ``cosine`` is the schedule of Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17) with s = 0.008;
    ``exp`` is ``abar(t) = exp(-12 t)``.
    """

    def cosine(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    def exp(t: float) -> float:
        return math.exp(-12.0 * t)

    alpha_bar = {"cosine": cosine, "exp": exp}[kind]
    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta) for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(
    owner: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
    allowed: Sequence[str] = BETA_SCHEDULES,
) -> torch.Tensor:
    """The training betas a config describes (``trained_betas`` wins over ``beta_schedule``)."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    else:
        check_choice(owner, "beta_schedule", beta_schedule, allowed)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":  # linear in sqrt(beta), as Stable Diffusion trained
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(num_train_timesteps)
        elif beta_schedule == "exp":
            betas = betas_for_alpha_bar(num_train_timesteps, kind="exp")
        else:  # "sigmoid" (DDPM)
            betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(
    owner: str,
    spacing: str,
    num_inference_steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    fractional_linspace: bool = False,
) -> np.ndarray:
    """``num_inference_steps`` descending training timesteps (Lin et al. 2023, table 2).

    ``linspace`` spans ``[0, T-1]`` evenly (rounded unless ``fractional_linspace``), ``leading``
    takes multiples of ``T // n`` plus ``steps_offset``, ``trailing`` counts down from ``T - 1``
    in steps of ``T / n``. Returned as float64; callers cast to their dtype.
    """
    check_choice(owner, "timestep_spacing", spacing, TIMESTEP_SPACINGS)
    n, big_t = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n)
        if fractional_linspace:
            ts = ts.astype(np.float32)
        else:
            ts = ts.round()
        return ts[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float64) + steps_offset
    return np.round(np.arange(big_t, 0, -big_t / n)).astype(np.float64) - 1


def solver_timesteps(
    owner: str,
    spacing: str,
    num_inference_steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Timesteps for the multistep ODE solvers (DPM-Solver, UniPC, DEIS), as int64.

    These divide ``[0, last_timestep)`` into ``n + 1`` points and drop the final zero, so the
    last step lands on a small positive timestep.
    """
    check_choice(owner, "timestep_spacing", spacing, TIMESTEP_SPACINGS)
    n = num_inference_steps
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.arange(last, 0, -num_train_timesteps / n).round().astype(np.int64) - 1


def training_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """k-diffusion noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (float32, ascending in t)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps, linearly interpolated between training steps."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 ("EDM"), eq. 5: evenly spaced in ``sigma^(1/rho)`` from max to min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas evenly spaced in log-sigma from max to min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log-sigma.

    ``log_sigmas`` are the training log-sigmas, ascending in t. Values outside the table clamp to
    its ends.
    """
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.searchsorted(log_sigmas, log_sigma, side="right") - 1
    low = np.clip(low, 0, log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def sigma_to_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP coefficients of a k-diffusion sigma: ``alpha = 1/sqrt(1+sigma^2)``, ``sigma_vp = sigma*alpha``."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def add_noise_vp(alphas_cumprod: torch.Tensor, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
    abar = alphas_cumprod.to(device=original.device, dtype=original.dtype)[timesteps.to(original.device)]
    a = abar**0.5
    b = (1 - abar) ** 0.5
    shape = (-1, *([1] * (original.ndim - 1)))
    return a.flatten().reshape(shape) * original + b.flatten().reshape(shape) * noise


def velocity_vp(alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """v-prediction target ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022, sec. 4)."""
    abar = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[timesteps.to(sample.device)]
    shape = (-1, *([1] * (sample.ndim - 1)))
    return (abar**0.5).flatten().reshape(shape) * noise - ((1 - abar) ** 0.5).flatten().reshape(shape) * sample
