"""The sdxl plugin as gesso sees it: registration, run configs, the tiny checkpoint (no reference needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gesso.contract import load_object
from gesso.plugins import get_host


def test_family_is_registered_with_its_policy_and_defaults():
    from gesso.config import family_defaults

    family = get_host().registry.families["sdxl"]
    assert family.pipeline_class().__name__ == "StableDiffusionXLPipeline"
    assert family.score({"_class_name": "StableDiffusionXLPipeline"}) > 0
    assert family.score({"_class_name": "StableDiffusionPipeline"}) == 0
    policy = family.execution_policy
    assert dict(policy.float32_when) == {"vae": "force_upcast"}
    assert policy.offload_order == ("text_encoder", "text_encoder_2", "unet", "vae")
    assert policy.hot_loop == ("unet",)
    defaults = family_defaults(family.config_defaults)
    assert defaults.num_inference_steps == 50 and defaults.guidance_scale == 5.0
    pipeline_class = family.pipeline_class()
    assert (pipeline_class.default_num_inference_steps, pipeline_class.default_guidance_scale) == (50, 5.0)
    for key, default in family.config_keys.items():  # every run-config key is a call parameter with the same default
        accepted = {**pipeline_class.extra_call_parameters, "guidance_rescale": 0.0}
        assert key in accepted and accepted[key] == default, key


def test_call_defaults_match_the_reference_signature():
    inspect = pytest.importorskip("inspect")
    diffusers = pytest.importorskip("diffusers")
    from gesso_sdxl.plugin import CONFIG_KEYS

    parameters = inspect.signature(diffusers.StableDiffusionXLPipeline.__call__).parameters
    for key, default in CONFIG_KEYS.items():
        assert parameters[key].default == default, key
    assert parameters["num_inference_steps"].default == 50 and parameters["guidance_scale"].default == 5.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = get_host().registry.families["sdxl"]
    return load_object(spec.tiny_checkpoint)(tmp_path_factory.mktemp("tiny-sdxl"))


def test_run_config_passes_sdxl_keys(tiny, tmp_path, plugin_host):
    """A run config with SDXL's own keys gives the image of the same direct call."""
    import gesso
    import gesso_sdxl.plugin
    from gesso import AutoPipelineForText2Image

    plugin_host(gesso_sdxl.plugin)  # this plugin alone: other installed plugins add call keys of their own

    config = {
        "model": str(tiny),
        "prompt": "a lighthouse",
        "prompt_2": "at dusk",
        "negative_prompt": "blurry",
        "original_size": [64, 48],
        "crops_coords_top_left": [4, 8],
        "negative_original_size": [16, 16],
        "negative_target_size": [24, 24],
        "guidance_rescale": 0.5,
        "num_inference_steps": 3,
        "seed": 7,
        "output": {"dir": str(tmp_path)},
    }
    result = gesso.run(config, write=False)
    assert result.config.family == "sdxl"
    pipeline = AutoPipelineForText2Image.from_pretrained(tiny)
    expected = pipeline(
        "a lighthouse",
        prompt_2="at dusk",
        negative_prompt="blurry",
        original_size=(64, 48),
        crops_coords_top_left=(4, 8),
        negative_original_size=(16, 16),
        negative_target_size=(24, 24),
        guidance_rescale=0.5,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    plain = gesso.run({**config, "crops_coords_top_left": [0, 0]}, write=False)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(expected))


def test_misspelt_sdxl_key_is_refused(tiny):
    from gesso.config import ConfigError
    from gesso.runner import resolve_config

    with pytest.raises(ConfigError, match="original_size"):
        resolve_config({"model": str(tiny), "orignal_size": [64, 64]})


def test_unknown_call_argument_and_watermark_are_refused(tiny):
    from gesso import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(tiny, add_watermarker=False)
    with pytest.raises(TypeError, match="prompt_3"):
        pipeline("a", prompt_3="b")
    with pytest.raises(ValueError, match="watermark"):
        AutoPipelineForText2Image.from_pretrained(tiny, add_watermarker=True)
