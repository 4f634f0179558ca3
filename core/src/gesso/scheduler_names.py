"""The scheduler short names users know, kept apart from the schedulers themselves.

This module imports nothing heavy, so listing plugins (``gesso plugins``) registers the short names
without importing torch. Each maps to a class name and the config overrides that make it that sampler.
"""

from __future__ import annotations

from typing import Any

_NOT_KARRAS = {"use_karras_sigmas": False}

SHORT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", dict(_NOT_KARRAS)),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", dict(_NOT_KARRAS)),
    "lms": ("LMSDiscreteScheduler", dict(_NOT_KARRAS)),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **_NOT_KARRAS}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **_NOT_KARRAS}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", dict(_NOT_KARRAS)),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", dict(_NOT_KARRAS)),
}
