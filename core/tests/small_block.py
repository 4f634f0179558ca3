"""One small ResnetBlock2D and its inputs for the compiled-block tests (``test_aot``,
``test_precompiled``), built from the same text in a test and in the child processes it starts, so
that both hold the same weights and inputs."""

from __future__ import annotations

import textwrap
from typing import Any

import torch

SETUP = textwrap.dedent(
    """
    import torch
    from gesso.nn.resnet import ResnetBlock2D
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4).eval()
    generator = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 8, 8, 8, generator=generator), torch.randn(2, 12, generator=generator)
    """
)


def _setup() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(SETUP, namespace)  # noqa: S102 - the child processes run the same text
    return namespace


def block() -> torch.nn.Module:
    return _setup()["block"]


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    namespace = _setup()
    return namespace["x"].to(dtype), namespace["temb"].to(dtype)
