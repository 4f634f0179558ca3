"""The sd15 family's own tests, written with gesso.testing (tiny random checkpoints, CPU)."""

from __future__ import annotations

import logging

import gesso
import pytest
import torch
from gesso.nn import AutoencoderKL, UNet2DConditionModel
from gesso.runner import load_pipeline, resolve_config
from gesso.schedulers import EulerAncestralDiscreteScheduler, PNDMScheduler
from gesso.testing import assert_images_differ, assert_plugin_loads, assert_same_image_for_seed
from gesso_sd15.pipeline import StableDiffusionPipeline
from gesso_sd15.safety_checker import StableDiffusionSafetyChecker


@pytest.fixture
def host(plugin_host):
    """The built-ins and this family only: other installed plugins cannot interfere."""
    return plugin_host(entry_points=["sd15"])


@pytest.fixture
def pipeline(host, tiny_checkpoint):
    return gesso.AutoPipelineForText2Image.from_pretrained(tiny_checkpoint("sd15"))


def test_plugin_registers_the_family_and_the_safety_checker():
    info = assert_plugin_loads("sd15")
    assert info.registers == {"families": ["sd15"], "components": ["stable_diffusion/StableDiffusionSafetyChecker"]}


def test_loads_through_auto_pipeline(pipeline):
    assert type(pipeline) is StableDiffusionPipeline
    assert isinstance(pipeline.unet, UNet2DConditionModel) and isinstance(pipeline.vae, AutoencoderKL)
    assert type(pipeline.text_encoder).__name__ == "CLIPTextModel"
    assert isinstance(pipeline.scheduler, PNDMScheduler)
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None


def test_safety_checker_component_loads_when_the_checkpoint_has_one(host, tiny_checkpoint):
    pipeline = gesso.AutoPipelineForText2Image.from_pretrained(tiny_checkpoint("sd15", safety_checker=True))
    assert isinstance(pipeline.safety_checker, StableDiffusionSafetyChecker)
    result = pipeline("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert len(result.nsfw_content_detected) == 1
    dropped = gesso.AutoPipelineForText2Image.from_pretrained(tiny_checkpoint("sd15", safety_checker=True), safety_checker=None)
    assert dropped.safety_checker is None


def test_same_seed_same_image_and_another_seed_another(pipeline):
    images = assert_same_image_for_seed(pipeline, seed=3, negative_prompt="blurry", num_images_per_prompt=2)
    assert images.shape == (2, 32, 32, 3)


def test_run_config_takes_the_family_defaults(host, tiny_checkpoint):
    config = resolve_config({"model": str(tiny_checkpoint("sd15"))})
    assert config.family == "sd15"
    assert (config.num_inference_steps, config.guidance_scale) == (50, 7.5)


def test_gesso_run_with_a_scheduler_swap(host, tiny_checkpoint):
    config = {"model": str(tiny_checkpoint("sd15")), "prompt": "a lighthouse", "num_inference_steps": 3}
    swapped = {**config, "scheduler": "euler_a"}
    pipeline = load_pipeline(resolve_config(swapped), host)
    assert isinstance(pipeline.scheduler, EulerAncestralDiscreteScheduler)
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"  # the checkpoint's betas carry over
    assert pipeline.scheduler.config.steps_offset == 1
    # euler_a draws fresh noise every step: from the call's generator, or this fails
    ancestral = assert_same_image_for_seed(swapped, seed=7)
    assert_images_differ(ancestral, assert_same_image_for_seed(config, seed=7, other_seed=None))


def test_long_prompt_warns_naming_the_truncated_text(pipeline, caplog):
    prompt = " ".join(["a"] * 80) + " purple elephant"
    with caplog.at_level(logging.WARNING, logger="gesso"):
        pipeline(prompt, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    (record,) = [r for r in caplog.records if "truncated" in r.getMessage()]
    message = record.getMessage()
    assert "77 tokens" in message and "purple elephant" in message
    assert message.split(":", 1)[1].count("a ") < 10  # only the cut-off part is quoted, not the whole prompt
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gesso"):
        pipeline("a short prompt", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_bad_inputs_raise_the_reference_exception_types(pipeline):
    call = {"num_inference_steps": 1, "output_type": "latent"}
    with pytest.raises(ValueError, match="divisible by 8 but are 60 and 64"):
        pipeline("a cat", height=60, width=64, **call)
    embeds = torch.zeros(1, 77, pipeline.text_encoder.config.hidden_size)
    with pytest.raises(ValueError, match="Cannot forward both `prompt`"):
        pipeline("a cat", prompt_embeds=embeds, **call)
    with pytest.raises(TypeError, match="`negative_prompt` should be the same type to `prompt`"):
        pipeline("a cat", negative_prompt=["a dog"], **call)
    with pytest.raises(ValueError, match="`negative_prompt`: .* has batch size 2"):
        pipeline(["a cat"], negative_prompt=["a dog", "a bird"], **call)
