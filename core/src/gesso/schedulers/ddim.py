"""Deterministic-leaning samplers over the discrete VP chain: DDIM, PNDM (PLMS) and LCM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config
from gesso.noise import randn_tensor

from .base import LCMSchedulerOutput, SchedulerOutput, check_choice
from .ddpm import PREDICTION_TYPES, VPSchedulerMixin, predict_x0
from .schedules import make_betas, spaced_timesteps


def _final_alpha_cumprod(alphas_cumprod: torch.Tensor, set_alpha_to_one: bool) -> torch.Tensor:
    """abar used past the last step: exactly 1 (a clean image), or abar_0 as SD was trained."""
    return torch.tensor(1.0) if set_alpha_to_one else alphas_cumprod[0]


class DDIMScheduler(VPSchedulerMixin):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12); ``eta`` = 1 recovers DDPM."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._init_alphas(
            make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr)
        )  # fmt: skip
        self.final_alpha_cumprod = _final_alpha_cumprod(self.alphas_cumprod, set_alpha_to_one)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps per ``timestep_spacing``."""
        cfg = self.config
        if num_inference_steps > cfg.num_train_timesteps:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds {cfg.num_train_timesteps}")
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(type(self).__name__, cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps, cfg.steps_offset)
        self._store_timesteps(torch.from_numpy(ts.astype(np.int64)).to(device))

    def _abar_prev(self, prev_t: int) -> torch.Tensor:
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """sigma_t^2 / eta^2 of Song et al. eq. 16."""
        abar_t, abar_prev = self.alphas_cumprod[timestep], self._abar_prev(prev_timestep)
        return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (Song et al. eq. 12)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = self._timestep_value(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_prev(prev_t)
        beta_t = 1 - abar_t
        kind = self.config.prediction_type
        x0 = predict_x0(kind, model_output, sample, abar_t)
        if kind == "epsilon":
            eps = model_output
        elif kind == "sample":
            eps = (sample - abar_t**0.5 * x0) / beta_t**0.5
        else:
            eps = abar_t**0.5 * model_output + beta_t**0.5 * sample
        x0 = self._clip_or_threshold(x0)
        std = eta * self._get_variance(t, prev_t) ** 0.5
        if use_clipped_model_output:
            eps = (sample - abar_t**0.5 * x0) / beta_t**0.5
        prev_sample = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std * variance_noise
        self._advance(timestep)
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class PNDMScheduler(VPSchedulerMixin):
    """Pseudo numerical methods for diffusion models (Liu et al. 2022): Runge-Kutta warm-up (PRK),
    then 4th-order linear multistep (PLMS, eq. 12) on the DDIM transfer function (eq. 11)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._init_alphas(make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas))
        self.final_alpha_cumprod = _final_alpha_cumprod(self.alphas_cumprod, set_alpha_to_one)
        self.pndm_order = 4
        self._reset_state()
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None

    def _reset_state(self) -> None:
        self.cur_model_output: Any = 0
        self.counter = 0
        self.cur_sample: torch.Tensor | None = None
        self.ets: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Spaced timesteps; PRK repeats the last four at half steps, PLMS repeats the second one."""
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        base = spaced_timesteps(type(self).__name__, cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps, cfg.steps_offset)[
            ::-1
        ].astype(np.int64)  # ascending
        if cfg.skip_prk_steps:
            # the first PLMS step is a two-stage (Heun-like) step, so its timestep appears twice
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            half = cfg.num_train_timesteps // num_inference_steps // 2
            prk = base[-self.pndm_order :].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        ts = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._store_timesteps(torch.from_numpy(ts).to(device))
        self._reset_state()

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """A PRK stage while warming up, a PLMS step afterwards."""
        assert self.prk_timesteps is not None
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One of the four stages of a classic Runge-Kutta step (weights 1/6, 1/3, 1/3, 1/6)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        assert self.prk_timesteps is not None
        t_value = self._timestep_value(timestep)
        diff = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t_value - diff
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        start = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(start, t, prev_t, model_output)
        self.counter += 1
        self._advance(timestep)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_plms(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """Linear multistep on the noise estimates, of order min(4, steps so far) (Liu et al. eq. 12)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PLMS steps need the PRK warm-up first (12 PRK stages)")
        t = self._timestep_value(timestep)
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # second stage of the first step: re-take the first step with averaged noise
            prev_t, t = t, t + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev_sample = self._get_prev_sample(sample, t, prev_t, model_output)
        self.counter += 1
        self._advance(timestep)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _get_prev_sample(self, sample: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
        """The transfer phi(x_t, eps, t, t-delta) of Liu et al. eq. 11 (a DDIM step)."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev
        if self.config.prediction_type == "v_prediction":
            eps = abar_t**0.5 * eps + beta_t**0.5 * sample
        denom = abar_t * beta_prev**0.5 + (abar_t * beta_t * abar_prev) ** 0.5
        return (abar_prev / abar_t) ** 0.5 * sample - (abar_prev - abar_t) * eps / denom


class LCMScheduler(VPSchedulerMixin):
    """Latent consistency models (Luo et al. 2023): each step maps x_t to the consistency function's
    x0 estimate (boundary-condition scalings c_skip, c_out) and re-noises it to the next timestep."""

    _compatibles = ()

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        self._init_alphas(
            make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr)
        )  # fmt: skip
        self.final_alpha_cumprod = _final_alpha_cumprod(self.alphas_cumprod, set_alpha_to_one)
        self.custom_timesteps = False
        self.sigma_data = 0.5

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Pick ``num_inference_steps`` of the distillation schedule's timesteps, evenly by index."""
        cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        original = original_inference_steps or cfg.original_inference_steps
        if original > cfg.num_train_timesteps:
            raise ValueError(f"original_inference_steps={original} exceeds {cfg.num_train_timesteps}")
        k = cfg.num_train_timesteps // original
        origin = np.asarray(list(range(1, int(original * strength) + 1))) * k - 1  # the distillation grid
        if timesteps is not None:
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError("timesteps must be in descending order")
            if timesteps[0] >= cfg.num_train_timesteps:
                raise ValueError(f"timesteps must start below num_train_timesteps={cfg.num_train_timesteps}")
            ts = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(ts)
            self.custom_timesteps = True
            kept = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            ts = ts[max(self.num_inference_steps - kept, 0) * self.order :]
        else:
            if num_inference_steps > cfg.num_train_timesteps:
                raise ValueError(f"num_inference_steps={num_inference_steps} exceeds {cfg.num_train_timesteps}")
            if len(origin) // num_inference_steps < 1:
                raise ValueError(f"num_inference_steps={num_inference_steps} needs original_inference_steps * strength >= it")
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            origin = origin[::-1].copy()
            picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            ts = origin[picks]
        self._store_timesteps(torch.from_numpy(ts).to(device=device, dtype=torch.long))

    def get_scalings_for_boundary_condition_discrete(self, timestep: Any) -> tuple[Any, Any]:
        """c_skip = s_d^2 / (t'^2 + s_d^2), c_out = t' / sqrt(t'^2 + s_d^2), t' = t * timestep_scaling."""
        scaled = timestep * self.config.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """Consistency step: x0 = c_out * f(x_t) + c_skip * x_t, then noise x0 to the next timestep."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        index = self._ensure_step_index(timestep)
        host = self._timesteps_host
        t = int(host[index]) if isinstance(timestep, torch.Tensor) else int(timestep)
        prev_t = int(host[index + 1]) if index + 1 < len(host) else t
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)
        x0 = self._clip_or_threshold(predict_x0(self.config.prediction_type, model_output, sample, abar_t))
        denoised = c_out * x0 + c_skip * sample
        if index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = abar_prev.sqrt() * denoised + (1 - abar_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
