"""Shared helpers: the real checkpoint scheduler configs and a deterministic fake denoiser."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = Path(__file__).resolve().parents[3] / "tests" / "data" / "full-size-architectures.json"


def real_configs() -> dict[str, dict[str, Any]]:
    data = json.loads(ARCHITECTURES.read_text())
    return {
        "sd15": data["sd15"]["scheduler"],
        "sdxl": data["sdxl"]["scheduler"],
        "kandinsky22": data["kandinsky22"]["scheduler"],
        "kandinsky22_prior": data["kandinsky22"]["prior_scheduler"],
    }


def fake_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    """A smooth, deterministic stand-in for a denoiser: depends on the input and the timestep."""
    tf = torch.as_tensor(t, dtype=torch.float32)
    return 0.6 * torch.tanh(x) + 0.05 * x * torch.cos(tf / 170.0) + 0.02 * torch.sin(3 * x + tf / 97.0)


def run_loop(scheduler: Any, steps: int, x0: torch.Tensor, seed: int = 0, **step_kwargs: Any) -> list[torch.Tensor]:
    """Drive a scheduler through a full denoising loop as pipelines do; returns every prev_sample."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    params = inspect.signature(scheduler.step).parameters
    x = x0 * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    out = []
    for i, t in enumerate(timesteps):
        kwargs = dict(step_kwargs)
        if "generator" in params:
            kwargs["generator"] = generator
        if "prev_timestep" in params:  # the unCLIP prior pipelines pass the next timestep
            kwargs["prev_timestep"] = None if i + 1 == len(timesteps) else timesteps[i + 1]
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(fake_model(model_input, t), t, x, **kwargs).prev_sample
        out.append(x)
    return out
