"""DEIS: diffusion exponential integrator sampler (Zhang & Chen 2023), multistep "tAB" in log-rho."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config

from .base import SchedulerOutput, check_choice
from .dpm_solver import SolverMixin, log_snr
from .schedules import make_betas, sigma_to_alpha_sigma


def _ab2_integral(t: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Antiderivative in rho of the Lagrange basis through log b (vs log c), order 2."""
    return t * (-torch.log(c) + torch.log(t) - 1) / (torch.log(b) - torch.log(c))


def _ab3_integral(t: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Antiderivative in rho of the Lagrange basis through log b (vs log c, log d), order 3."""
    lt, lc, ld = torch.log(t), torch.log(c), torch.log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((torch.log(b) - lc) * (torch.log(b) - ld))


class DEISMultistepScheduler(SolverMixin):
    """DEIS-tAB of order 1-3 with the "logrho" polynomial extrapolation (Zhang & Chen 2023, eq. 15)."""

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        name = type(self).__name__
        if algorithm_type in ("dpmsolver", "dpmsolver++"):  # a DPM-Solver config swapped in
            self.register_to_config(algorithm_type="deis")
        else:
            check_choice(name, "algorithm_type", algorithm_type, ("deis",))
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")
        else:
            check_choice(name, "solver_type", solver_type, ("logrho",))
        betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self._init_solver(name, betas)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, mu: float | None = None) -> None:
        """Solver timesteps; the final sigma repeats the last one (Karras/exponential) or is sigma_min."""
        if mu is not None:
            raise ValueError("DEISMultistepScheduler: mu= needs dynamic shifting, which gesso does not support")
        sig, ts = self._schedule(num_inference_steps)
        last = sig[-1] if self.family != "interp" else self._sigma_min()
        self._finish_schedule(np.concatenate([sig, [last]]), ts, device)

    def convert_model_output(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor = None, **kw: Any):
        """epsilon, recomputed from the (possibly thresholded) x0 prediction."""
        if sample is None:
            sample = args[-1]
        x0 = self._to_data(model_output, sample)
        alpha_t, sigma_t = sigma_to_alpha_sigma(self.sigmas[self._step_index])
        return (sample - alpha_t * x0) / sigma_t

    def _rhos(self, *offsets: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(alpha, rho = sigma / alpha) at step_index + offset."""
        out = []
        for k in offsets:
            alpha, sigma = sigma_to_alpha_sigma(self.sigmas[self._step_index + k])
            out.append((alpha, sigma / alpha))
        return out

    def deis_first_order_update(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor = None, **kw: Any):
        """Order 1 (= DDIM): x_t = alpha_t / alpha_s x_s - sigma_t (e^h - 1) eps."""
        alpha_t, sigma_t, lam_t = log_snr(self.sigmas[self._step_index + 1])
        alpha_s, _, lam_s = log_snr(self.sigmas[self._step_index])
        return alpha_t / alpha_s * sample - sigma_t * (torch.exp(lam_t - lam_s) - 1.0) * model_output

    def multistep_deis_second_order_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None, **kw: Any
    ) -> torch.Tensor:
        """Order 2: integrate the linear-in-log-rho extrapolation of eps exactly."""
        (alpha_t, rho_t), (alpha_s0, rho_s0), (_, rho_s1) = self._rhos(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        c1 = _ab2_integral(rho_t, rho_s0, rho_s1) - _ab2_integral(rho_s0, rho_s0, rho_s1)
        c2 = _ab2_integral(rho_t, rho_s1, rho_s0) - _ab2_integral(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + c1 * m0 + c2 * m1)

    def multistep_deis_third_order_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None, **kw: Any
    ) -> torch.Tensor:
        """Order 3: the quadratic-in-log-rho extrapolation."""
        (alpha_t, rho_t), (alpha_s0, rho_s0), (_, rho_s1), (_, rho_s2) = self._rhos(1, 0, -1, -2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        c1 = _ab3_integral(rho_t, rho_s0, rho_s1, rho_s2) - _ab3_integral(rho_s0, rho_s0, rho_s1, rho_s2)
        c2 = _ab3_integral(rho_t, rho_s1, rho_s2, rho_s0) - _ab3_integral(rho_s0, rho_s1, rho_s2, rho_s0)
        c3 = _ab3_integral(rho_t, rho_s2, rho_s0, rho_s1) - _ab3_integral(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (sample / alpha_s0 + c1 * m0 + c2 * m1 + c3 * m2)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One multistep update, of order min(solver_order, steps taken + 1), lowered near the end."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        cfg = self.config
        i = self._ensure_step_index(timestep)
        n = len(self._timesteps_host)
        low_final = i == n - 1 and cfg.lower_order_final and n < 15
        low_second = i == n - 2 and cfg.lower_order_final and n < 15
        model_output = self.convert_model_output(model_output, sample=sample)
        self._push(model_output)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or low_final:
            prev_sample = self.deis_first_order_update(model_output, sample=sample)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or low_second:
            prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample=sample)
        else:
            prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample=sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
