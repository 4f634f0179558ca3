"""Helpers for parity tests against the reference implementation (diffusers, used here as an oracle only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[3] / "tests" / "data" / "full-size-architectures.json"


def full_config(*keys: str) -> dict:
    """A published component's config from tests/data, without the bookkeeping keys."""
    node = json.loads(DATA.read_text())
    for key in keys:
        node = node[key]
    return {k: v for k, v in node.items() if not k.startswith("_")}


def perturb_vectors(model: torch.nn.Module, seed: int = 0) -> None:
    """Make biases and norm affines non-trivial, so that swapped or ignored ones change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def cheap_random_init(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill a model built on the meta device and moved with ``to_empty``: N(0, std) weights, 1-d
    params around 1 for norm weights and around 0 otherwise, so activations stay finite at full depth."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Elementwise closeness with the tolerance scaled to the reference's magnitude."""
    assert actual.shape == expected.shape
    assert torch.isfinite(expected).all()
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1.0))
    assert expected.abs().max() > 0  # a vanishing reference would prove nothing
