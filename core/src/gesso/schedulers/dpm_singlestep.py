"""Singlestep DPM-Solver(++) (Lu et al. 2022, Algorithms 1-2; DPM++ 2S: Lu et al. 2022b, Algorithm 1).

Each solver step of order k spans k schedule intervals: its first interval is a first-order step
from the saved start sample, later intervals re-integrate from that start using all the model
outputs gathered since (so every ``step`` call returns a usable sample).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gesso.configuration import register_to_config
from gesso.noise import randn_tensor

from .base import SchedulerOutput, check_choice
from .dpm_solver import DPMSolverUpdatesMixin
from .schedules import interp_sigmas, make_betas, training_sigmas

logger = logging.getLogger(__name__)


def singlestep_orders(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The order used at each step: cycles 1, 2(, 3), shortened at the end when ``lower_order_final``."""
    if lower_order_final:
        full, rest = divmod(steps, order)
        if order == 3:
            orders = [1, 2, 3] * (full - 1) + [1, 2] + [1] if rest == 0 else [1, 2, 3] * full + [1, 2][:rest]
        elif order == 2:
            orders = [1, 2] * (full - 1) + [1, 1] if rest == 0 else [1, 2] * full + [1]
        else:
            orders = [1] * steps
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(DPMSolverUpdatesMixin):
    """Singlestep DPM-Solver / DPM-Solver++ of order 1-3 (``dpmpp_2s`` is order 2, ``dpmsolver++``)."""

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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        name = type(self).__name__
        check_choice(name, "solver_order", solver_order, (1, 2, 3))
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        else:
            check_choice(name, "algorithm_type", algorithm_type, ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"))
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        else:
            check_choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if self.config.algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError(f"{name}: final_sigmas_type='zero' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++'")
        betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self._init_solver(name, betas)
        self.sample: torch.Tensor | None = None
        self.order_list = self.get_order_list(num_train_timesteps)

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """See :func:`singlestep_orders`."""
        cfg = self.config
        return singlestep_orders(num_inference_steps, cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type == "zero")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Evenly spaced timesteps over [0, T) clipped at ``lambda_min_clipped``, and the order list."""
        cfg = self.config
        if mu is not None:
            raise ValueError(f"{type(self).__name__}: mu= needs dynamic shifting, which gesso does not support")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if self.family != "interp":
                raise ValueError("timesteps cannot be given with use_karras_sigmas/use_exponential_sigmas")
            n = len(timesteps)
            ts = np.array(timesteps).astype(np.int64)
            sigmas = interp_sigmas(ts, training_sigmas(self.alphas_cumprod))
        else:
            n = num_inference_steps
            clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped))
            sigmas, ts = self._schedule(n, cfg.num_train_timesteps - clipped)
        last = self._sigma_min() if cfg.final_sigmas_type == "sigma_min" else 0
        self._finish_schedule(np.concatenate([sigmas, [last]]), ts, device)
        self.num_inference_steps = n
        self.sample = None
        if not cfg.lower_order_final and (n % cfg.solver_order != 0 or cfg.final_sigmas_type == "zero"):
            logger.info("%s: setting lower_order_final=True for %d steps", type(self).__name__, n)
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(n)

    def singlestep_dpm_solver_second_order_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None,
        noise: torch.Tensor | None = None, **kw: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Second order from s1 (where ``sample`` was taken) to t, through s0 (Lu et al. 2022 Alg. 1)."""
        (alpha_t, sigma_t, lam_t), (_, _, lam_s0), (alpha_s1, sigma_s1, lam_s1) = self._lambdas(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lam_t - lam_s1, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m1, (1.0 / r0) * (m0 - m1)
        kind, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if kind == "dpmsolver++":
            phi = torch.exp(-h) - 1.0
            base = sigma_t / sigma_s1 * sample - alpha_t * phi * d0
            return base - 0.5 * (alpha_t * phi) * d1 if midpoint else base + alpha_t * (phi / h + 1.0) * d1
        if kind == "dpmsolver":
            phi = torch.exp(h) - 1.0
            base = alpha_t / alpha_s1 * sample - sigma_t * phi * d0
            return base - 0.5 * (sigma_t * phi) * d1 if midpoint else base - sigma_t * (phi / h - 1.0) * d1
        phi = 1 - torch.exp(-2.0 * h)
        base = sigma_t / sigma_s1 * torch.exp(-h) * sample + alpha_t * phi * d0
        corr = 0.5 * (alpha_t * phi) * d1 if midpoint else alpha_t * (phi / (-2.0 * h) + 1.0) * d1
        return base + corr + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def singlestep_dpm_solver_third_order_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None,
        noise: torch.Tensor | None = None, **kw: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Third order from s2 to t through s1 and s0 (Lu et al. 2022, Algorithm 2)."""
        lam = self._lambdas(1, 0, -1, -2)
        (alpha_t, sigma_t, lam_t), lam_s0, lam_s1 = lam[0], lam[1][2], lam[2][2]
        alpha_s2, sigma_s2, lam_s2 = lam[3]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lam_t - lam_s2, lam_s0 - lam_s2, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d0 = m2
        d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        kind, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if kind == "dpmsolver++":
            phi = torch.exp(-h) - 1.0
            base = sigma_t / sigma_s2 * sample - alpha_t * phi * d0
            if midpoint:
                return base + alpha_t * (phi / h + 1.0) * d1_1
            return base + alpha_t * (phi / h + 1.0) * d1 - alpha_t * ((phi + h) / h**2 - 0.5) * d2
        if kind == "dpmsolver":
            phi = torch.exp(h) - 1.0
            base = alpha_t / alpha_s2 * sample - sigma_t * phi * d0
            if midpoint:
                return base - sigma_t * (phi / h - 1.0) * d1_1
            return base - sigma_t * (phi / h - 1.0) * d1 - sigma_t * ((phi - h) / h**2 - 0.5) * d2
        phi = 1.0 - torch.exp(-2.0 * h)
        base = sigma_t / sigma_s2 * torch.exp(-h) * sample + alpha_t * phi * d0
        noise_term = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        if midpoint:
            return base + alpha_t * (phi / (-2.0 * h) + 1.0) * d1_1 + noise_term
        return (
            base + alpha_t * (phi / (-2.0 * h) + 1.0) * d1
            + alpha_t * ((phi + -2.0 * h) / (-2.0 * h) ** 2 - 0.5) * d2 + noise_term
        )  # fmt: skip

    def singlestep_dpm_solver_update(
        self, model_output_list: list[torch.Tensor], *args: Any, sample: torch.Tensor = None, order: int = None,
        noise: torch.Tensor | None = None, **kw: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Dispatch on ``order``."""
        if order == 1:
            return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample, noise=noise)
        if order == 2:
            return self.singlestep_dpm_solver_second_order_update(model_output_list, sample=sample, noise=noise)
        return self.singlestep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Advance one interval with the order the order list gives this step."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        i = self._ensure_step_index(timestep)
        model_output = self.convert_model_output(model_output, sample=sample)
        self._push(model_output)
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        order = self.order_list[i]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        prev_sample = self.singlestep_dpm_solver_update(self.model_outputs, sample=self.sample, order=order, noise=noise)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
