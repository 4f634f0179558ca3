"""The example scheduler plugin, tested as its author would: through gesso.testing."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import gesso
import numpy as np
import pytest
import torch
from gesso.plugins import PluginHost
from gesso.runner import load_pipeline, resolve_config
from gesso.schedulers import EulerDiscreteScheduler
from gesso.testing import assert_images_differ, assert_pipelines_agree, assert_plugin_loads, assert_same_image_for_seed
from gesso_example_scheduler.scheduler import EulerPolyExponentialScheduler
from packaging.requirements import Requirement

#: A scheduler config as Stable Diffusion checkpoints ship it (PNDM's, with its own extra keys).
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def test_entry_point_loads_and_registers_the_scheduler():
    info = assert_plugin_loads("example_scheduler")
    assert info.distribution == "gesso-example-scheduler"
    assert info.registers == {"schedulers": ["EulerPolyExponentialScheduler"]}
    registry = PluginHost(allow=["example_scheduler"]).registry
    assert registry.scheduler_short_names["euler_polyexp_rho2"] == ("EulerPolyExponentialScheduler", {"rho": 2.0})


def test_declared_gesso_requirement_admits_the_running_gesso():
    requirements = [Requirement(r) for r in metadata.requires("gesso-example-scheduler") or []]
    gesso_requirement = next(r for r in requirements if r.name == "gesso" and r.marker is None)
    assert str(gesso_requirement.specifier) == "<0.2,>=0.1"
    assert gesso_requirement.specifier.contains(gesso.__version__)


def test_a_release_for_another_gesso_is_reported_and_skipped(fake_distribution):
    site = fake_distribution(
        "gesso-example-scheduler-next", {"example_scheduler_next": "gesso_example_scheduler.plugin"}, requires=["gesso>=0.2,<0.3"]
    )
    host = PluginHost(allow=["example_scheduler_next", "sd15"], strict=False)
    (failure,) = host.failures
    assert (failure.name, failure.stage) == ("example_scheduler_next", "incompatible")
    assert f"requires gesso<0.3,>=0.2, but gesso {gesso.__version__} is installed" in failure.error
    assert "euler_polyexp" not in host.registry.scheduler_short_names
    assert "sd15" in host.registry.families  # the others still load
    # and what `gesso plugins` prints: the installed example listed, the incompatible one reported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "gesso", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "example_scheduler (gesso-example-scheduler 0.1.0)\n  schedulers: EulerPolyExponentialScheduler" in listing.stdout
    assert "FAILED example_scheduler_next [gesso-example-scheduler-next] at incompatible: requires gesso<0.3,>=0.2" in listing.stdout


def test_rho_1_is_the_builtin_euler_on_exponential_sigmas():
    ours = EulerPolyExponentialScheduler.from_config(SD_SCHEDULER)
    builtin = EulerDiscreteScheduler.from_config(SD_SCHEDULER, use_exponential_sigmas=True, timestep_spacing="linspace")
    ours.set_timesteps(12)
    builtin.set_timesteps(12)
    torch.testing.assert_close(ours.sigmas, builtin.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, builtin.timesteps, rtol=1e-5, atol=1e-3)
    assert ours.init_noise_sigma == pytest.approx(float(builtin.init_noise_sigma))


def test_larger_rho_keeps_the_ends_and_moves_steps_to_low_noise():
    flat = EulerPolyExponentialScheduler.from_config(SD_SCHEDULER)
    steep = EulerPolyExponentialScheduler.from_config(SD_SCHEDULER, rho=2.0)
    flat.set_timesteps(10)
    steep.set_timesteps(10)
    assert steep.sigmas[0] == flat.sigmas[0] and steep.sigmas[-2] == pytest.approx(float(flat.sigmas[-2]))
    assert (np.diff(steep.sigmas.numpy()) < 0).all() and (np.diff(steep.timesteps.numpy()) < 0).all()
    assert (steep.sigmas[1:-2] < flat.sigmas[1:-2]).all()


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        EulerPolyExponentialScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="rho must be positive"):
        EulerPolyExponentialScheduler(rho=0)


@pytest.fixture
def host(plugin_host):
    """Only this plugin and the family it is tested on: other installed plugins cannot interfere."""
    return plugin_host(entry_points=["sd15", "example_scheduler"])


def test_denoising_trajectory_matches_the_builtin_euler(host, tiny_checkpoint):
    checkpoint = tiny_checkpoint("sd15")
    ours = gesso.AutoPipelineForText2Image.from_pretrained(checkpoint)
    builtin = gesso.AutoPipelineForText2Image.from_pretrained(checkpoint)
    ours.scheduler = EulerPolyExponentialScheduler.from_config(ours.scheduler.config)
    builtin.scheduler = EulerDiscreteScheduler.from_config(
        builtin.scheduler.config, use_exponential_sigmas=True, timestep_spacing="linspace"
    )
    assert_pipelines_agree(ours, builtin, seed=5, num_inference_steps=4, output_type="latent", atol=1e-4)


def test_usable_by_name_from_a_run_config(host, tiny_checkpoint):
    config = {
        "model": str(tiny_checkpoint("sd15")),
        "prompt": "a lighthouse at dusk",
        "num_inference_steps": 3,
        "scheduler": "euler_polyexp_rho2",
    }
    result = gesso.run(config, write=False)
    assert result.config.scheduler == "euler_polyexp_rho2"
    pipeline = load_pipeline(resolve_config(config), host)
    assert isinstance(pipeline.scheduler, EulerPolyExponentialScheduler)
    assert pipeline.scheduler.config.rho == 2.0 and pipeline.scheduler.config.beta_schedule == "scaled_linear"  # the checkpoint's betas
    ours = assert_same_image_for_seed(config, seed=11)
    assert_images_differ(ours, assert_same_image_for_seed({**config, "scheduler": "euler_polyexp"}, seed=11, other_seed=None))
    assert_images_differ(ours, assert_same_image_for_seed({**config, "scheduler": None}, seed=11, other_seed=None))
