"""Parity with the reference implementation (diffusers, used here as an oracle only).

For real checkpoint scheduler configs swapped into every class as users do (``from_config``),
timesteps, sigmas, ``init_noise_sigma`` and a whole denoising trajectory with a deterministic fake
model and seeded generators must match the reference to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import gesso.schedulers as ours
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from scheduler_helpers import real_configs, run_loop  # noqa: E402

CONFIGS = real_configs()

SD15_CLASSES = [
    "PNDMScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LCMScheduler",
]

KARRAS = {"use_karras_sigmas": True}
VPRED = {"prediction_type": "v_prediction"}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
SDE_KARRAS = {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}

CASES: list[tuple[str, str, dict[str, Any], int]] = [
    *[(name, "sd15", {}, 10) for name in SD15_CLASSES],
    *[(name, "sdxl", {}, 10) for name in SD15_CLASSES],
    ("PNDMScheduler", "sd15", {"skip_prk_steps": False}, 10),
    ("PNDMScheduler", "sd15", {"timestep_spacing": "trailing"}, 7),
    ("PNDMScheduler", "sd15", VPRED, 10),
    ("DDIMScheduler", "sd15", VPRED, 10),
    ("DDIMScheduler", "sd15", {**VPRED, **ZERO_SNR}, 10),
    ("DDIMScheduler", "sd15", {"timestep_spacing": "linspace", "set_alpha_to_one": True}, 9),
    ("DDIMScheduler", "sd15", {"clip_sample": True, "prediction_type": "sample"}, 8),
    ("DDIMScheduler", "sd15", {"thresholding": True, "sample_max_value": 1.5}, 8),
    ("DDPMScheduler", "kandinsky22", {}, 10),
    ("DDPMScheduler", "kandinsky22", {**VPRED, **ZERO_SNR}, 10),
    ("DDPMScheduler", "sd15", {"variance_type": "fixed_small_log", "beta_schedule": "squaredcos_cap_v2"}, 10),
    ("DDPMScheduler", "sd15", {"variance_type": "fixed_large"}, 10),
    ("UnCLIPScheduler", "kandinsky22_prior", {}, 25),
    ("UnCLIPScheduler", "kandinsky22_prior", {"prediction_type": "epsilon", "clip_sample": False}, 10),
    ("EulerDiscreteScheduler", "sdxl", VPRED, 10),
    ("EulerDiscreteScheduler", "sdxl", KARRAS, 10),
    ("EulerDiscreteScheduler", "sdxl", {**VPRED, **ZERO_SNR}, 10),
    ("EulerDiscreteScheduler", "sdxl", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, 10),
    ("EulerDiscreteScheduler", "sdxl", {"interpolation_type": "log_linear"}, 10),
    ("EulerDiscreteScheduler", "sdxl", {"timestep_spacing": "linspace"}, 13),
    ("EulerAncestralDiscreteScheduler", "sdxl", VPRED, 10),
    ("EulerAncestralDiscreteScheduler", "sdxl", {**VPRED, **ZERO_SNR}, 10),
    ("HeunDiscreteScheduler", "sdxl", KARRAS, 8),
    ("HeunDiscreteScheduler", "sdxl", VPRED, 8),
    ("LMSDiscreteScheduler", "sdxl", KARRAS, 10),
    ("LMSDiscreteScheduler", "sdxl", VPRED, 10),
    ("KDPM2DiscreteScheduler", "sdxl", KARRAS, 8),
    ("KDPM2AncestralDiscreteScheduler", "sdxl", KARRAS, 8),
    ("KDPM2AncestralDiscreteScheduler", "sdxl", VPRED, 8),
    ("DPMSolverMultistepScheduler", "sdxl", KARRAS, 10),
    ("DPMSolverMultistepScheduler", "sdxl", SDE_KARRAS, 10),
    ("DPMSolverMultistepScheduler", "sdxl", {"algorithm_type": "sde-dpmsolver++"}, 20),
    ("DPMSolverMultistepScheduler", "sdxl", {**VPRED, **ZERO_SNR}, 10),
    ("DPMSolverMultistepScheduler", "sdxl", {"solver_order": 3, "timestep_spacing": "linspace"}, 20),
    ("DPMSolverMultistepScheduler", "sdxl", {"solver_type": "heun", "use_lu_lambdas": True}, 10),
    ("DPMSolverMultistepScheduler", "sdxl", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 10),
    ("DPMSolverMultistepScheduler", "sdxl", {"use_exponential_sigmas": True, "euler_at_final": True}, 10),
    ("DPMSolverMultistepScheduler", "sdxl", {"thresholding": True, "prediction_type": "sample"}, 10),
    ("DPMSolverSinglestepScheduler", "sdxl", KARRAS, 10),
    ("DPMSolverSinglestepScheduler", "sdxl", {"solver_order": 3}, 11),
    ("DPMSolverSinglestepScheduler", "sdxl", {"algorithm_type": "sde-dpmsolver++"}, 10),
    ("UniPCMultistepScheduler", "sdxl", KARRAS, 10),
    ("UniPCMultistepScheduler", "sdxl", {**VPRED, **ZERO_SNR}, 10),
    ("UniPCMultistepScheduler", "sdxl", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 12),
    ("UniPCMultistepScheduler", "sdxl", {"predict_x0": False, "disable_corrector": [0, 3], "final_sigmas_type": "sigma_min"}, 10),
    ("DEISMultistepScheduler", "sdxl", {"solver_order": 3}, 12),
    ("DEISMultistepScheduler", "sdxl", KARRAS, 10),
    ("LCMScheduler", "sd15", {}, 4),
    ("LCMScheduler", "sd15", {"original_inference_steps": 50, "timestep_spacing": "trailing"}, 6),
]


def _ids(case: tuple[str, str, dict[str, Any], int]) -> str:
    name, base, overrides, steps = case
    extra = ",".join(f"{k}={v}" for k, v in overrides.items())
    return f"{name}-{base}-{steps}{'-' + extra if extra else ''}"


def _pair(name: str, base: str, overrides: dict[str, Any]) -> tuple[Any, Any]:
    config = CONFIGS[base]
    return getattr(ours, name).from_config(config, **overrides), getattr(diffusers, name).from_config(config, **overrides)


def _close(a: Any, b: Any, what: str, rtol: float = 2e-5, atol: float = 2e-5) -> None:
    a_t, b_t = torch.as_tensor(a), torch.as_tensor(b)
    assert a_t.shape == b_t.shape, f"{what}: shape {tuple(a_t.shape)} != {tuple(b_t.shape)}"
    torch.testing.assert_close(a_t.double(), b_t.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(case: tuple[str, str, dict[str, Any], int]) -> None:
    name, base, overrides, steps = case
    mine, ref = _pair(name, base, overrides)
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1234))

    traj_mine = run_loop(mine, steps, x0, seed=7)
    traj_ref = run_loop(ref, steps, x0, seed=7)

    assert mine.timesteps.dtype == ref.timesteps.dtype
    _close(mine.timesteps, ref.timesteps, "timesteps", rtol=0, atol=1e-4)
    if hasattr(ref, "sigmas") and torch.is_tensor(ref.sigmas) and ref.sigmas.numel() < 1000:
        _close(mine.sigmas, ref.sigmas, "sigmas", rtol=1e-6, atol=0)
    _close(mine.init_noise_sigma, ref.init_noise_sigma, "init_noise_sigma", rtol=1e-6, atol=0)
    assert mine.order == getattr(ref, "order", 1)
    for i, (a, b) in enumerate(zip(traj_mine, traj_ref, strict=True)):
        assert torch.isfinite(b).all(), f"reference diverged at step {i}; pick a sound config"
        scale = max(b.abs().max().item(), 1.0)
        _close(a, b, f"step {i}", rtol=2e-5, atol=2e-5 * scale)
