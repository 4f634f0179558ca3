"""UniPC: unified predictor-corrector (Zhao et al. 2023), multistep, in log-SNR time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config

from .base import SchedulerOutput, check_choice
from .dpm_solver import SolverMixin, log_snr
from .schedules import make_betas


def unipc_coefficients(
    rks: list[torch.Tensor], hh: torch.Tensor, solver_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear system of UniPC (Zhao et al. 2023, Algorithm 1/2): rows ``r_k^(i-1)``, right-hand side
    ``phi_{i+1}(hh) * i! / B(h)``, with B(h) = hh (bh1) or expm1(hh) (bh2).

    Returns (R, b, h_phi_1, B_h); ``rks`` includes the trailing 1 of the current point.
    """
    r = torch.stack(rks)
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rows, rhs = [], []
    for i in range(1, len(rks) + 1):
        rows.append(torch.pow(r, i - 1))
        rhs.append(h_phi_k * math.factorial(i) / b_h)
        h_phi_k = h_phi_k / hh - 1 / math.factorial(i + 1)
    return torch.stack(rows), torch.stack(rhs), h_phi_1, b_h


def weighted_sum(weights: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor | int:
    """sum_k w_k * D_k, with the (host) weights used as scalars."""
    total: torch.Tensor | int = 0
    for k, d in enumerate(tensors):
        total = total + weights[k] * d
    return total


class UniPCMultistepScheduler(SolverMixin):
    """UniPC with the B(h) variants bh1/bh2, predicting x0 (``predict_x0``) or noise."""

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        solver_p: Any = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ) -> None:
        name = type(self).__name__
        if solver_type in ("midpoint", "heun", "logrho"):  # DPM-Solver / DEIS configs swapped in
            self.register_to_config(solver_type="bh2")
        else:
            check_choice(name, "solver_type", solver_type, ("bh1", "bh2"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if shift_terminal:
            raise ValueError(f"{name}: shift_terminal is not supported by gesso")
        betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                           rescale_betas_zero_snr)  # fmt: skip
        self._init_solver(name, betas, zero_snr=rescale_betas_zero_snr)
        self.sigmas = self.sigmas.to("cpu")
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self.last_sample: torch.Tensor | None = None

    def _reset_history(self) -> None:
        super()._reset_history()
        self.timestep_list: list[Any] = [None] * self.config.solver_order
        self.last_sample = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Solver timesteps; Karras/exponential sigmas end at sigma_min or 0 per ``final_sigmas_type``."""
        if sigmas is not None or mu is not None:
            raise ValueError("UniPCMultistepScheduler: sigmas= and mu= need flow sigmas, which gesso does not support")
        sig, ts = self._schedule(num_inference_steps)
        if self.config.final_sigmas_type == "zero":
            last: Any = 0
        else:
            last = sig[-1] if self.family != "interp" else self._sigma_min()
        self._finish_schedule(np.concatenate([sig, [last]]), ts, device)
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def convert_model_output(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor = None, **kw: Any):
        """x0 (``predict_x0``) or epsilon from the network output."""
        if sample is None:
            sample = args[-1]
        return self._to_data(model_output, sample) if self.predict_x0 else self._to_noise(model_output, sample)

    def _history_terms(self, s0_index: int, order: int, lam_s0: torch.Tensor, h: torch.Tensor, skip: int):
        """r_k = (lambda_{s_k} - lambda_{s0}) / h and D1_k = (m_k - m0) / r_k for the older outputs."""
        m0 = self.model_outputs[-1]
        rks, d1s = [], []
        for i in range(1, order):
            lam_si = log_snr(self.sigmas[s0_index - i - skip])[2]
            rk = (lam_si - lam_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(i + 1)] - m0) / rk)
        rks.append(torch.ones(()))
        return rks, d1s

    def multistep_uni_p_bh_update(
        self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor = None, order: int = None, **kw: Any
    ) -> torch.Tensor:
        """UniP predictor of order ``order`` from the current point to the next."""
        if self.solver_p:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        i = self._step_index
        alpha_t, sigma_t, lam_t = log_snr(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lam_s0 = log_snr(self.sigmas[i])
        h = lam_t - lam_s0
        rks, d1s = self._history_terms(i, order, lam_s0, h, skip=0)
        hh = -h if self.predict_x0 else h
        r, b, h_phi_1, b_h = unipc_coefficients(rks, hh, self.config.solver_type)
        m0, x = self.model_outputs[-1], sample
        if not d1s:
            pred_res: Any = 0
        else:
            rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
            pred_res = weighted_sum(rhos.to(x.dtype), d1s)
        if self.predict_x0:
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * b_h * pred_res
        else:
            x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0 - sigma_t * b_h * pred_res
        return x_t.to(x.dtype)

    def multistep_uni_c_bh_update(
        self,
        this_model_output: torch.Tensor,
        *args: Any,
        last_sample: torch.Tensor = None,
        this_sample: torch.Tensor = None,
        order: int = None,
        **kw: Any,
    ) -> torch.Tensor:
        """UniC corrector: refine the previous step's result with the new model output."""
        i = self._step_index
        alpha_t, sigma_t, lam_t = log_snr(self.sigmas[i])
        alpha_s0, sigma_s0, lam_s0 = log_snr(self.sigmas[i - 1])
        h = lam_t - lam_s0
        rks, d1s = self._history_terms(i, order, lam_s0, h, skip=1)
        hh = -h if self.predict_x0 else h
        r, b, h_phi_1, b_h = unipc_coefficients(rks, hh, self.config.solver_type)
        m0, x = self.model_outputs[-1], last_sample
        rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r, b)
        rhos = rhos.to(x.dtype)
        corr_res = weighted_sum(rhos[:-1], d1s) if d1s else 0
        d1_t = this_model_output - m0
        if self.predict_x0:
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * b_h * (corr_res + rhos[-1] * d1_t)
        else:
            x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0 - sigma_t * b_h * (corr_res + rhos[-1] * d1_t)
        return x_t.to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Correct the last step with UniC (unless disabled), then predict the next one with UniP."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        i = self._ensure_step_index(timestep)
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(converted, last_sample=self.last_sample, this_sample=sample, order=self.this_order)
        self._push(converted)
        self.timestep_list = [*self.timestep_list[1:], timestep]
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self._timesteps_host) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample=sample, order=self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
