"""Same checkpoint, arguments and seed: gesso's image equals the reference's (float32, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image

from tests.parity.helpers import generate
from tests.parity.reference_checkpoints import write_reference_sd15

ATOL = 1e-3  # per pixel on [0, 1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_reference_sd15(tmp_path_factory.mktemp("ref-sd15"))


@pytest.fixture(scope="module")
def pipelines(checkpoint):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)
    ours = AutoPipelineForText2Image.from_pretrained(checkpoint)
    return reference, ours


CASES = {
    "single prompt": {"prompt": "an astronaut riding a horse"},
    "batch and images per prompt": {"prompt": ["a cat", "the dog on a sofa"], "num_images_per_prompt": 2},
    "negative prompts": {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "ugly, deformed"]},
    "no guidance": {"prompt": "a cat", "guidance_scale": 1.0},
    "guidance rescale": {"prompt": "a cat", "guidance_rescale": 0.7},
    "non-square size": {"prompt": "a tall tower", "height": 48, "width": 32},
    "list of generators": {"prompt": ["a cat", "a dog"], "generators": 2},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_same_image_as_reference(pipelines, case):
    reference, ours = pipelines
    expected = generate(reference, **dict(CASES[case]))
    actual = generate(ours, **dict(CASES[case]))
    assert actual.images.shape == expected.images.shape
    np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)
    assert actual.nsfw_content_detected == expected.nsfw_content_detected


def test_safety_checker_flags_like_reference(checkpoint, pipelines):
    reference, ours = pipelines
    clip_input = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    checkers = (reference.safety_checker, ours.safety_checker)
    with torch.no_grad():  # put one concept's threshold at the median score: about half are flagged
        embeds = torch.nn.functional.normalize(checkers[0].visual_projection(checkers[0].vision_model(clip_input)[1]))
        scores = embeds @ torch.nn.functional.normalize(checkers[0].concept_embeds).T
        for checker in checkers:
            checker.concept_embeds_weights[1] = scores[:, 1].median()
    try:
        _, expected = reference.safety_checker(images=images.clone(), clip_input=clip_input)
        checked, flags = ours.safety_checker(images=images.clone(), clip_input=clip_input)
    finally:
        with torch.no_grad():
            for checker in checkers:
                checker.concept_embeds_weights[1] = 1.0
    assert flags == expected
    assert any(flags) and not all(flags), "the test checkpoint should flag some inputs and pass others"
    for flagged, image, original in zip(flags, checked, images):
        assert torch.equal(image, torch.zeros_like(image) if flagged else original)


def test_pipeline_reports_flags_and_safety_checker_can_be_dropped(checkpoint, pipelines):
    reference, ours = pipelines
    kwargs = {"prompt": ["a", "b"], "num_inference_steps": 2}
    expected = generate(reference, **dict(kwargs))
    actual = generate(ours, **dict(kwargs))
    assert actual.nsfw_content_detected == expected.nsfw_content_detected
    assert len(actual.nsfw_content_detected) == 2
    unchecked = AutoPipelineForText2Image.from_pretrained(checkpoint, safety_checker=None)
    assert unchecked.safety_checker is None
    result = generate(unchecked, **dict(kwargs))
    assert result.nsfw_content_detected is None


def test_prompt_embeds_path(pipelines):
    reference, ours = pipelines
    embeds, negative = ours.encode_prompt("a cat", torch.device("cpu"), 1, True, "blurry")
    ref_embeds, ref_negative = reference.encode_prompt("a cat", torch.device("cpu"), 1, True, "blurry")
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(negative, ref_negative)
    expected = generate(reference, prompt_embeds=ref_embeds, negative_prompt_embeds=ref_negative)
    actual = generate(ours, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)


@pytest.mark.parametrize("output_type", ["pt", "latent", "pil"])
def test_output_types(pipelines, output_type):
    reference, ours = pipelines
    expected = generate(reference, prompt="a cat", output_type=output_type, num_inference_steps=2)
    actual = generate(ours, prompt="a cat", output_type=output_type, num_inference_steps=2)
    if output_type == "pil":
        left, right = np.asarray(actual.images[0], dtype=np.int16), np.asarray(expected.images[0], dtype=np.int16)
        assert np.abs(left - right).max() <= 1
    else:
        torch.testing.assert_close(actual.images, expected.images, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "short_name,reference_class,overrides",
    [
        ("euler_a", "EulerAncestralDiscreteScheduler", {}),
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("ddim", "DDIMScheduler", {}),
    ],
)
def test_swapped_schedulers_match(checkpoint, pipelines, short_name, reference_class, overrides):
    import diffusers
    from gesso.plugins import get_host

    reference, ours = pipelines
    reference_scheduler, our_scheduler = reference.scheduler, ours.scheduler
    try:
        reference.scheduler = getattr(diffusers, reference_class).from_config(reference_scheduler.config, **overrides)
        ours.scheduler = get_host().registry.make_scheduler(short_name, our_scheduler.config)
        expected = generate(reference, prompt="a cat", seed=3)
        actual = generate(ours, prompt="a cat", seed=3)
        np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)
    finally:
        reference.scheduler, ours.scheduler = reference_scheduler, our_scheduler


def test_callback_on_step_end_sees_and_replaces_latents(pipelines):
    reference, ours = pipelines

    def halve_at_step_one(pipe, step, timestep, tensors):
        if step == 1:
            tensors["latents"] = tensors["latents"] * 0.5
        return tensors

    kwargs = {
        "prompt": "a cat",
        "callback_on_step_end": halve_at_step_one,
        "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"],
    }
    expected = generate(reference, **dict(kwargs))
    actual = generate(ours, **dict(kwargs))
    np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)


def test_fp16_variant_checkpoint_loads(tmp_path_factory):
    import diffusers

    folder = write_reference_sd15(tmp_path_factory.mktemp("ref-sd15-fp16"), variant="fp16", safety_checker=False)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    ours = AutoPipelineForText2Image.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    assert ours.unet.dtype == torch.float32
    expected = generate(reference, prompt="a cat")
    actual = generate(ours, prompt="a cat")
    np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)


def test_clip_skip_uses_the_penultimate_layer(pipelines):
    """The reference 0.42.1 fails on clip_skip with transformers 5, so check its meaning directly:
    clip_skip=1 equals a text encoder with its last layer removed, then the final layer norm."""
    import copy

    _, ours = pipelines
    skipped, _ = ours.encode_prompt("a cat", torch.device("cpu"), 1, False, clip_skip=1)
    shallow = copy.deepcopy(ours.text_encoder)
    encoder = getattr(shallow, "text_model", shallow).encoder
    encoder.layers = encoder.layers[:-1]
    ids = ours.tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(skipped, shallow(ids)[0])
    full, _ = ours.encode_prompt("a cat", torch.device("cpu"), 1, False)
    assert not torch.allclose(skipped, full)


def test_our_save_pretrained_loads_in_the_reference(checkpoint, tmp_path):
    """gesso writes the pipeline (its own CLIP classes and safety checker) in the reference's layout:
    the reference loads the folder and makes the same images, and reads the checker's thresholds
    (lowered below every score in a second save: it flags every image, as gesso does)."""
    import diffusers

    ours = AutoPipelineForText2Image.from_pretrained(checkpoint)
    kwargs = {"prompt": ["a cat", "a dog"], "num_inference_steps": 2}
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    with torch.no_grad():
        ours.safety_checker.concept_embeds_weights[1] = -1.0
    ours.save_pretrained(tmp_path / "strict")
    for folder, flags in (("saved", [False, False]), ("strict", [True, True])):
        reference = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / folder)
        reference.set_progress_bar_config(disable=True)
        expected = generate(reference, **dict(kwargs))
        actual = generate(ours if folder == "strict" else AutoPipelineForText2Image.from_pretrained(checkpoint), **dict(kwargs))
        assert actual.nsfw_content_detected == expected.nsfw_content_detected == flags
        np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)
