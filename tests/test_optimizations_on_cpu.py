"""Every optimization that the registry says runs on the CPU for a family generates that family's image
there, close to the plain pipeline's: a claim of CPU support is a promise to the config and the CLI,
which accept the name and would otherwise fail halfway through a generation.

SD1.5 and SDXL only: the tiny Kandinsky checkpoint's random MoVQ decoder turns differences of 1e-5 in
its latents into visible ones (its attention saturates on latents of magnitude 25), so its images
cannot tell a correct optimization from a wrong one; the Kandinsky plugin's tests check its
optimizations on what they change. ``compile_aot`` compiles C++ packages and has its own tests
(core/tests/test_aot.py)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.plugins import get_host
from gesso.runner import optimize

FAMILIES = {"sd15": "gesso_sd15.tiny", "sdxl": "gesso_sdxl.tiny"}
CASES = [
    (family, name)
    for family in FAMILIES
    for name, spec in sorted(get_host().registry.optimizations.items())
    if spec.supports(family, "cpu") is None and name != "compile_aot"
]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Each family's tiny checkpoint and its image without optimizations."""
    found = {}
    for family, module in FAMILIES.items():
        folder = importlib.import_module(module).write_tiny_checkpoint(tmp_path_factory.mktemp(family) / family)
        found[family] = folder, image(AutoPipelineForText2Image.from_pretrained(folder))
    return found


def image(pipeline) -> np.ndarray:
    return np.asarray(pipeline("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images)


def test_the_cases_cover_the_cpu_optimizations_of_the_core_and_the_plugins():
    names = {name for _, name in CASES}
    assert {"channels_last", "compile", "cross_kv_once", "sdpa_flash", "vae_tiling", "control_embedding_once"} <= names
    assert not names & {"cuda_graph", "sdpa_efficient", "offload"}


@pytest.mark.parametrize(("family", "name"), CASES)
def test_an_optimization_that_claims_the_cpu_generates_there(plain, family, name, monkeypatch):
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # compiled graphs without code generation (CI time)
    monkeypatch.setenv("GESSO_COMPILE_CACHE", "off")
    folder, expected = plain[family]
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, [name])
    np.testing.assert_allclose(image(pipeline), expected, atol=1e-3)
