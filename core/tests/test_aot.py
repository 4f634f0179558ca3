"""compile_aot: a module run from an AOTInductor package, compiled once and loaded by later processes.

Compiling even a small block takes seconds of C++ compilation on the CPU, so the tests compile two
small modules only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import small_block
import torch
from gesso.nn.unet_2d_condition import UNet2DConditionOutput
from gesso.optimize.aot import compile_module

CHILD = small_block.SETUP + textwrap.dedent(
    """
    import json, sys
    from gesso.optimize.aot import compile_module
    with torch.no_grad():
        eager = block(x, temb)
        compile_module(block)
        out = block(x, temb)
    compiler = [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]
    print(json.dumps({"error": (out - eager).abs().max().item(), "compiler": compiler}))
    """
)


def test_a_package_matches_eager_and_a_new_process_loads_it_without_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("GESSO_AOT_CACHE", str(tmp_path))
    block = small_block.block()
    x, temb = small_block.inputs()
    with torch.no_grad():
        eager = block(x, temb)
        compile_module(block)
        compiled = block(x, temb)
        again = block(x, temb)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    packages = list(tmp_path.glob("ResnetBlock2D-*.pt2"))
    assert len(packages) == 1
    assert not list(tmp_path.glob(".partial-*"))  # the compile's work folder is gone

    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env={**os.environ, "GESSO_AOT_CACHE": str(tmp_path)}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] < 1e-5
    assert report["compiler"] == []  # loaded, not recompiled: neither Dynamo nor Inductor imported
    assert list(tmp_path.glob("ResnetBlock2D-*.pt2")) == packages


class _DataclassOutput(torch.nn.Module):
    """A module with a reference-style dataclass output (as the UNet's ``UNet2DConditionOutput``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, sample: torch.Tensor, scale: float = 1.0) -> UNet2DConditionOutput:
        return UNet2DConditionOutput(sample=torch.nn.functional.silu(self.proj(sample)) * scale)


def test_dataclass_outputs_come_back_as_their_class_and_new_weights_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("GESSO_AOT_CACHE", str(tmp_path))
    module = _DataclassOutput().eval()
    sample = torch.randn(3, 6)
    with torch.no_grad():
        compile_module(module)
        output = module(sample, scale=2.0)
        assert isinstance(output, UNet2DConditionOutput)
        torch.testing.assert_close(output.sample, torch.nn.functional.silu(module.proj(sample)) * 2.0)
        # weights are inputs of the package, not baked into it: changing them changes the result
        module.proj.weight.mul_(-1)
        torch.testing.assert_close(module(sample, scale=2.0).sample, torch.nn.functional.silu(module.proj(sample)) * 2.0)
    assert len(list(tmp_path.glob("*.pt2"))) == 1
