"""Exponential-integrator ODE/SDE solvers in log-SNR time: DPM-Solver(++) multistep, and the
shared machinery UniPC and DEIS use (schedules on lambda = log(alpha / sigma), model-output
conversion, step bookkeeping)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config
from gesso.noise import randn_tensor

from .base import SchedulerMixin, SchedulerOutput, check_choice, threshold_sample
from .kdiffusion import sigma_family
from .schedules import (
    exponential_sigmas,
    interp_sigmas,
    karras_sigmas,
    make_betas,
    sigma_to_alpha_sigma,
    sigma_to_t,
    solver_timesteps,
    training_sigmas,
)

_UNSUPPORTED_FLAGS = ("use_flow_sigmas", "use_dynamic_shifting")


def log_snr(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t) of a k-diffusion sigma."""
    alpha_t, sigma_t = sigma_to_alpha_sigma(sigma)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


class SolverMixin(SchedulerMixin):
    """Common state of the multistep solvers: VP coefficients, sigmas, past model outputs."""

    _missing_timestep_is_last = True
    init_noise_sigma = 1.0
    num_inference_steps: int | None = None

    def _init_solver(self, name: str, betas: torch.Tensor, zero_snr: bool = False) -> None:
        cfg = self.config
        for flag in _UNSUPPORTED_FLAGS:
            if self.option(flag):
                raise ValueError(f"{name}: {flag}=True is not supported by gesso")
        check_choice(name, "prediction_type", cfg.prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice(name, "timestep_spacing", self.option("timestep_spacing", "linspace"), ("linspace", "leading", "trailing"))
        self.family = sigma_family(
            name, self.option("use_karras_sigmas"), self.option("use_exponential_sigmas"), self.option("use_beta_sigmas")
        )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        ts = np.linspace(0, cfg.num_train_timesteps - 1, cfg.num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._store_timesteps(torch.from_numpy(ts))
        self._reset_history()

    def _reset_history(self) -> None:
        order = self.config.solver_order
        self.model_outputs: list[torch.Tensor | None] = [None] * order
        self.lower_order_nums = 0

    def _schedule(self, n: int, last_timestep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas without the final one, timesteps) for ``n`` steps, re-spaced per the sigma family."""
        cfg = self.config
        ts = solver_timesteps(
            type(self).__name__, self.option("timestep_spacing", "linspace"), n, cfg.num_train_timesteps,
            self.option("steps_offset", 0), last_timestep,
        )  # fmt: skip
        train = training_sigmas(self.alphas_cumprod)
        log_train = np.log(train)
        if self.family == "interp" and not self.option("use_lu_lambdas"):
            return interp_sigmas(ts, train), ts
        if self.option("use_lu_lambdas"):  # evenly spaced in lambda (Lu et al. 2022b, "DPM-Solver++", sec. 5)
            lambdas = np.flip(log_train.copy())
            sigmas = np.exp(karras_sigmas(lambdas[-1].item(), lambdas[0].item(), n, rho=1.0))
        else:
            desc = np.flip(train).copy()
            lo = self.option("sigma_min") if self.option("sigma_min") is not None else desc[-1].item()
            hi = self.option("sigma_max") if self.option("sigma_max") is not None else desc[0].item()
            sigmas = karras_sigmas(lo, hi, n) if self.family == "karras" else exponential_sigmas(lo, hi, n)
        ts = sigma_to_t(sigmas, log_train)
        if (self.family == "karras" or self.option("use_lu_lambdas")) and self._round_respaced():
            ts = ts.round()
        return sigmas, ts

    def _round_respaced(self) -> bool:
        return True

    def _finish_schedule(self, sigmas: np.ndarray, ts: np.ndarray, device: Any) -> None:
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self._sigmas_host = self.sigmas.tolist()
        self._store_timesteps(torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64))
        self.num_inference_steps = len(ts)
        self._reset_history()

    def _sigma_min(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The solvers feed the sample to the model unscaled."""
        return sample

    def _to_data(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 prediction at the current step (thresholded if configured)."""
        kind = self.config.prediction_type
        if kind == "sample":
            x0 = model_output
        else:
            alpha_t, sigma_t = sigma_to_alpha_sigma(self.sigmas[self._step_index])
            if kind == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            else:
                x0 = alpha_t * sample - sigma_t * model_output
        if self.config.thresholding:
            x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0

    def _to_noise(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """epsilon prediction at the current step (x0 thresholded first if configured)."""
        kind = self.config.prediction_type
        alpha_t, sigma_t = sigma_to_alpha_sigma(self.sigmas[self._step_index])
        if kind == "epsilon":
            eps = model_output
        elif kind == "sample":
            eps = (sample - alpha_t * model_output) / sigma_t
        else:
            eps = alpha_t * model_output + sigma_t * sample
        if self.config.thresholding:
            x0 = threshold_sample((sample - sigma_t * eps) / alpha_t, self.config.dynamic_thresholding_ratio,
                                  self.config.sample_max_value)  # fmt: skip
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def _push(self, model_output: torch.Tensor) -> None:
        self.model_outputs = [*self.model_outputs[1:], model_output]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at each sample's scheduled timestep."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._noise_indices(timesteps)].flatten()
        alpha_t, sigma_t = sigma_to_alpha_sigma(sigma)
        shape = (-1, *([1] * (original_samples.ndim - 1)))
        return alpha_t.reshape(shape) * original_samples + sigma_t.reshape(shape) * noise


class DPMSolverUpdatesMixin(SolverMixin):
    """Model-output conversion and the first-order update shared by both DPM-Solver schedulers."""

    def convert_model_output(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor = None, **kw: Any):
        """What the algorithm integrates: x0 for DPM-Solver++, epsilon for DPM-Solver."""
        if sample is None:
            sample = args[-1]
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return self._to_data(model_output, sample)
        return self._to_noise(model_output, sample)

    def _lambdas(self, *offsets: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [log_snr(self.sigmas[self._step_index + k]) for k in offsets]

    def dpm_solver_first_order_update(
        self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor = None, noise: torch.Tensor | None = None,
        **kw: Any,
    ) -> torch.Tensor:  # fmt: skip
        """One step of DPM-Solver-1 (= DDIM; Lu et al. 2022 eq. 3.7; 2022b eq. 5; SDE: appendix eq. for 1st order)."""
        (alpha_t, sigma_t, lam_t), (alpha_s, sigma_s, lam_s) = self._lambdas(1, 0)
        h = lam_t - lam_s
        kind = self.config.algorithm_type
        if kind == "dpmsolver++":
            return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * model_output
        if kind == "dpmsolver":
            return alpha_t / alpha_s * sample - sigma_t * (torch.exp(h) - 1.0) * model_output
        if kind == "sde-dpmsolver++":
            return (
                sigma_t / sigma_s * torch.exp(-h) * sample
                + alpha_t * (1 - torch.exp(-2.0 * h)) * model_output
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (
            alpha_t / alpha_s * sample
            - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * model_output
            + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        )


class DPMSolverMultistepScheduler(DPMSolverUpdatesMixin):
    """DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b), multistep, orders 1-3;
    the ``sde-`` algorithms are the SDE variants (DPM++ 2M SDE: Lu et al. 2022b, appendix)."""

    ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        name = type(self).__name__
        if algorithm_type == "deis":  # a DEIS config swapped in: the closest DPM-Solver
            self.register_to_config(algorithm_type="dpmsolver++")
        else:
            check_choice(name, "algorithm_type", algorithm_type, self.ALGORITHMS)
        if solver_type in ("logrho", "bh1", "bh2"):  # DEIS / UniPC configs swapped in
            self.register_to_config(solver_type="midpoint")
        else:
            check_choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if self.config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(
                f"{name}: final_sigmas_type='zero' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++' "
                f"(got {algorithm_type!r}); use final_sigmas_type='sigma_min'"
            )
        betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                           rescale_betas_zero_snr)  # fmt: skip
        self._init_solver(name, betas, zero_snr=rescale_betas_zero_snr)
        self.sigmas = self.sigmas.to("cpu")

    def _round_respaced(self) -> bool:
        return self.config.beta_schedule != "squaredcos_cap_v2"

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Timesteps over [0, T) clipped at ``lambda_min_clipped``; sigmas end at 0 or sigma_min."""
        cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if self.family != "interp" or cfg.use_lu_lambdas:
                raise ValueError("timesteps cannot be given with use_karras/exponential_sigmas or use_lu_lambdas")
            ts = np.array(timesteps).astype(np.int64)
            sigmas = interp_sigmas(ts, training_sigmas(self.alphas_cumprod))
        else:
            clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped))
            sigmas, ts = self._schedule(num_inference_steps, cfg.num_train_timesteps - clipped)
        last = self._sigma_min() if cfg.final_sigmas_type == "sigma_min" else 0
        self._finish_schedule(np.concatenate([sigmas, [last]]), ts, device)

    def multistep_dpm_solver_second_order_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None,
        noise: torch.Tensor | None = None, **kw: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Multistep second order (DPM-Solver++(2M): Lu et al. 2022b, Algorithm 2)."""
        (alpha_t, sigma_t, lam_t), (alpha_s0, sigma_s0, lam_s0), (_, _, lam_s1) = self._lambdas(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        kind, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if kind == "dpmsolver++":
            phi = torch.exp(-h) - 1.0
            base = sigma_t / sigma_s0 * sample - alpha_t * phi * d0
            return base - 0.5 * (alpha_t * phi) * d1 if midpoint else base + alpha_t * (phi / h + 1.0) * d1
        if kind == "dpmsolver":
            phi = torch.exp(h) - 1.0
            base = alpha_t / alpha_s0 * sample - sigma_t * phi * d0
            return base - 0.5 * (sigma_t * phi) * d1 if midpoint else base - sigma_t * (phi / h - 1.0) * d1
        if kind == "sde-dpmsolver++":
            phi = 1 - torch.exp(-2.0 * h)
            base = sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * phi * d0
            corr = 0.5 * (alpha_t * phi) * d1 if midpoint else alpha_t * (phi / (-2.0 * h) + 1.0) * d1
            return base + corr + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        phi = torch.exp(h) - 1.0
        base = alpha_t / alpha_s0 * sample - 2.0 * (sigma_t * phi) * d0
        corr = sigma_t * phi * d1 if midpoint else 2.0 * (sigma_t * (phi / h - 1.0)) * d1
        return base - corr + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise

    def multistep_dpm_solver_third_order_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None,
        noise: torch.Tensor | None = None, **kw: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Multistep third order (Lu et al. 2022b, appendix; Lu et al. 2022 Algorithm 3)."""
        lam = self._lambdas(1, 0, -1, -2)
        (alpha_t, sigma_t, lam_t), (alpha_s0, sigma_s0, lam_s0) = lam[0], lam[1]
        lam_s1, lam_s2 = lam[2][2], lam[3][2]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        kind = self.config.algorithm_type
        if kind == "dpmsolver++":
            phi = torch.exp(-h) - 1.0
            return (
                sigma_t / sigma_s0 * sample - alpha_t * phi * m0 + alpha_t * (phi / h + 1.0) * d1
                - alpha_t * ((phi + h) / h**2 - 0.5) * d2
            )  # fmt: skip
        if kind == "dpmsolver":
            phi = torch.exp(h) - 1.0
            return (
                alpha_t / alpha_s0 * sample - sigma_t * phi * m0 - sigma_t * (phi / h - 1.0) * d1
                - sigma_t * ((phi - h) / h**2 - 0.5) * d2
            )  # fmt: skip
        phi = 1.0 - torch.exp(-2.0 * h)
        return (
            sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * phi * m0
            + alpha_t * (phi / (-2.0 * h) + 1.0) * d1
            + alpha_t * ((phi - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )  # fmt: skip

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep update, of order min(solver_order, steps taken + 1), lowered near the end."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        cfg = self.config
        i = self._ensure_step_index(timestep)
        n = len(self._timesteps_host)
        final_first_order = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        final_second_order = i == n - 2 and cfg.lower_order_final and n < 15
        model_output = self.convert_model_output(model_output, sample=sample)
        self._push(model_output)
        sample = sample.to(torch.float32)
        noise = None
        if cfg.algorithm_type.startswith("sde-"):
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final_first_order:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample=sample, noise=noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or final_second_order:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
