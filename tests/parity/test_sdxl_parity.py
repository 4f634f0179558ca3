"""SDXL: same checkpoint, arguments and seed give the reference's image (float32, CPU).

Checkpoints are written by the reference's own ``StableDiffusionXLPipeline.save_pretrained`` and
loaded by gesso through ``AutoPipelineForText2Image``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image

from tests.parity.helpers import generate
from tests.parity.reference_sdxl import write_reference_sdxl

ATOL = 1e-3  # per pixel on [0, 1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_reference_sdxl(tmp_path_factory.mktemp("ref-sdxl"))


@pytest.fixture(scope="module")
def pipelines(checkpoint):
    import diffusers

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)
    ours = AutoPipelineForText2Image.from_pretrained(checkpoint)
    return reference, ours


def assert_same(actual, expected):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


CASES = {
    "default call": {"prompt": "an astronaut riding a horse"},
    "micro-conditioning": {
        "prompt": "a cat",
        "original_size": (64, 48),
        "crops_coords_top_left": (8, 4),
        "target_size": (40, 24),
    },
    "micro-conditioning with negatives": {
        "prompt": ["a cat", "a dog"],
        "negative_prompt": ["blurry", "ugly"],
        "original_size": [64, 48],
        "crops_coords_top_left": [8, 4],
        "target_size": [40, 24],
        "negative_original_size": (16, 16),
        "negative_crops_coords_top_left": (2, 6),
        "negative_target_size": (24, 32),
    },
    "prompt_2 and negative_prompt_2": {
        "prompt": "a cat",
        "prompt_2": "the dog in a garden",
        "negative_prompt": "blurry",
        "negative_prompt_2": "ugly, deformed",
    },
    "negative prompts": {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "ugly, deformed"]},
    "one negative prompt for a batch": {"prompt": ["a cat", "a dog"], "negative_prompt": "blurry"},
    "batch and images per prompt": {"prompt": ["a cat", "the dog on a sofa"], "num_images_per_prompt": 2},
    "no guidance": {"prompt": "a cat", "guidance_scale": 1.0},
    "guidance rescale": {"prompt": "a cat", "negative_prompt": "blurry", "guidance_rescale": 0.7},
    "non-square size": {"prompt": "a tall tower", "height": 48, "width": 32},
    "list of generators": {"prompt": ["a cat", "a dog"], "generators": 2},
    "clip skip": {"prompt": "a cat", "clip_skip": 1},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_same_image_as_reference(pipelines, case):
    reference, ours = pipelines
    expected = generate(reference, **dict(CASES[case]))
    actual = generate(ours, **dict(CASES[case]))
    assert_same(actual.images, expected.images)


def test_arguments_change_the_image(pipelines):
    """The parity cases would prove little if SDXL's extra arguments were ignored on both sides."""
    _, ours = pipelines
    base = generate(ours, prompt="a cat", negative_prompt="blurry").images
    for extra in ({"prompt_2": "a dog"}, {"negative_prompt_2": "ugly"}, {"original_size": (64, 48)}, {"crops_coords_top_left": (8, 4)},
                  {"target_size": (40, 24)}, {"negative_original_size": (16, 16), "negative_target_size": (24, 32)},
                  {"guidance_rescale": 0.7}, {"clip_skip": 1}):  # fmt: skip
        changed = generate(ours, prompt="a cat", negative_prompt="blurry", **extra).images
        assert np.abs(changed - base).max() > 1e-4, f"{extra} did not change the image"


def test_default_size_and_return_tuple(pipelines):
    reference, ours = pipelines
    expected = generate(reference, prompt="a cat", return_dict=False)
    actual = generate(ours, prompt="a cat", return_dict=False)
    assert len(actual) == len(expected) == 1
    size = ours.unet.config.sample_size * ours.vae_scale_factor
    assert actual[0].shape == (1, size, size, 3)
    assert_same(actual[0], expected[0])


@pytest.mark.parametrize("force_zeros", [True, False])
def test_force_zeros_for_empty_prompt(tmp_path_factory, checkpoint, pipelines, force_zeros):
    """The setting is read from model_index.json (both values), and from_pretrained can override it."""
    import diffusers

    reference_default, ours_default = pipelines
    if force_zeros:
        reference, ours = reference_default, ours_default
    else:
        folder = write_reference_sdxl(tmp_path_factory.mktemp("ref-sdxl-no-zeros"), force_zeros_for_empty_prompt=False)
        assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False
        reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
        reference.set_progress_bar_config(disable=True)
        ours = AutoPipelineForText2Image.from_pretrained(folder)
    assert ours.config.force_zeros_for_empty_prompt is force_zeros
    expected = generate(reference, prompt=["a cat", "a dog"])
    actual = generate(ours, prompt=["a cat", "a dog"])
    assert_same(actual.images, expected.images)
    _, negative, _, negative_pooled = ours.encode_prompt("a cat", None, torch.device("cpu"), 1, True)
    assert bool((negative == 0).all() and (negative_pooled == 0).all()) is force_zeros
    if not force_zeros:  # the same weights with zeros: a different image, equal to the override's
        assert np.abs(actual.images - generate(ours_default, prompt=["a cat", "a dog"]).images).max() > 1e-4
        overridden = AutoPipelineForText2Image.from_pretrained(checkpoint, force_zeros_for_empty_prompt=False)
        assert_same(generate(overridden, prompt=["a cat", "a dog"]).images, expected.images)


def test_denoising_end_returns_partly_denoised_latents(pipelines):
    reference, ours = pipelines
    calls = []
    hook = ours.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        kwargs = {"prompt": "a cat", "num_inference_steps": 10, "denoising_end": 0.62, "output_type": "latent"}
        expected = generate(reference, **dict(kwargs))
        actual = generate(ours, **dict(kwargs))
    finally:
        hook.remove()
    # leading spacing with offset 1: timesteps 901, 801, ..., 1; the cut keeps those >= round(1000 - 620) = 380
    assert len(calls) == 6 == ours.num_timesteps
    torch.testing.assert_close(actual.images, expected.images, atol=ATOL, rtol=0)
    full = generate(ours, prompt="a cat", num_inference_steps=10, output_type="latent").images
    assert not torch.allclose(full, actual.images, atol=1e-3)


def test_prompt_embeds_path(pipelines):
    reference, ours = pipelines
    args = ("a cat", "a dog", torch.device("cpu"), 2, True, "blurry", "ugly")
    ours_embeds = ours.encode_prompt(*args)
    reference_embeds = reference.encode_prompt(*args)
    for mine, theirs in zip(ours_embeds, reference_embeds, strict=True):
        torch.testing.assert_close(mine, theirs)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    single = dict(zip(names, reference.encode_prompt("a cat", None, torch.device("cpu"), 1, True, "blurry"), strict=True))
    expected = generate(reference, **single)
    actual = generate(ours, **single)
    assert_same(actual.images, expected.images)
    assert_same(actual.images, generate(ours, prompt="a cat", negative_prompt="blurry").images)


def test_input_errors_match_reference(pipelines):
    reference, ours = pipelines
    embeds = torch.zeros(1, 77, 64)
    for kwargs in ({"prompt_embeds": embeds}, {"prompt": "a", "prompt_2": "b", "prompt_embeds": embeds}, {"prompt": "a", "prompt_2": 3},
                   {"prompt": "a", "negative_prompt_2": "b", "negative_prompt_embeds": embeds}, {"prompt": ["a", "b"], "negative_prompt": ["c"]}):  # fmt: skip
        with pytest.raises(ValueError) as expected:
            generate(reference, num_inference_steps=1, **dict(kwargs))
        with pytest.raises(ValueError) as actual:
            generate(ours, num_inference_steps=1, **dict(kwargs))
        assert str(actual.value).split(":")[0] == str(expected.value).split(":")[0]


def test_added_embedding_width_is_checked(pipelines):
    _, ours = pipelines
    with pytest.raises(ValueError, match="added time embedding vector of length 80, but a vector of 88"):
        ours.add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, projection_dim=40)


def test_callback_sees_and_replaces_sdxl_tensors(pipelines):
    reference, ours = pipelines
    seen = {}

    def change_at_step_one(pipe, step, timestep, tensors):
        seen.setdefault(type(pipe).__module__.split(".")[0], {k: v.clone() for k, v in tensors.items()})
        if step == 1:
            tensors["latents"] = tensors["latents"] * 0.9
            tensors["add_time_ids"] = tensors["add_time_ids"] * 2
            tensors["add_text_embeds"] = tensors["add_text_embeds"] * 0.5
        return tensors

    kwargs = {
        "prompt": ["a cat", "a dog"],
        "negative_prompt": "blurry",
        "callback_on_step_end": change_at_step_one,
        "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"],
    }
    expected = generate(reference, **dict(kwargs))
    actual = generate(ours, **dict(kwargs))
    assert_same(actual.images, expected.images)
    for name, tensor in seen["diffusers"].items():
        torch.testing.assert_close(seen["gesso_sdxl"][name], tensor)
    assert set(ours.callback_tensor_inputs) == set(reference._callback_tensor_inputs)


def test_saved_checkpoints_load_both_ways(tmp_path, pipelines):
    """gesso's save_pretrained (and its tiny-checkpoint writer) give folders the reference loads."""
    import diffusers
    from gesso_sdxl.tiny import write_tiny_checkpoint

    _, ours = pipelines
    ours.force_zeros_for_empty_prompt = False
    try:
        ours.save_pretrained(tmp_path / "saved")
    finally:
        ours.force_zeros_for_empty_prompt = True
    write_tiny_checkpoint(tmp_path / "tiny")
    for folder, force_zeros in ((tmp_path / "saved", False), (tmp_path / "tiny", True)):
        reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
        reference.set_progress_bar_config(disable=True)
        assert reference.config.force_zeros_for_empty_prompt is force_zeros
        reloaded = AutoPipelineForText2Image.from_pretrained(folder)
        assert reloaded.force_zeros_for_empty_prompt is force_zeros
        assert_same(generate(reloaded, prompt=["a cat", "a dog"]).images, generate(reference, prompt=["a cat", "a dog"]).images)


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    folder = write_reference_sdxl(tmp_path_factory.mktemp("ref-sdxl-fp16"), variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    return folder


def test_fp16_variant_checkpoint_loads(fp16_checkpoint):
    import diffusers

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(fp16_checkpoint, variant="fp16", torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    ours = AutoPipelineForText2Image.from_pretrained(fp16_checkpoint, variant="fp16", torch_dtype=torch.float32)
    assert ours.unet.dtype == ours.vae.dtype == torch.float32
    assert_same(generate(ours, prompt="a cat").images, generate(reference, prompt="a cat").images)


def decoder_dtypes(pipeline):
    seen = []
    hook = pipeline.vae.decoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    return seen, hook


def test_float16_vae_with_force_upcast_decodes_in_float32(fp16_checkpoint):
    import diffusers

    ours = AutoPipelineForText2Image.from_pretrained(fp16_checkpoint, variant="fp16", torch_dtype=torch.float16)
    assert ours.vae.dtype == torch.float16 and ours.vae.config.force_upcast
    seen, hook = decoder_dtypes(ours)
    try:
        latents = generate(ours, prompt="a cat", num_inference_steps=2, output_type="latent").images
        assert latents.dtype == torch.float16
        images = ours.decode(latents, None)
    finally:
        hook.remove()
    assert seen == [torch.float32]
    assert ours.vae.dtype == torch.float16, "the VAE goes back to float16 after decoding"
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    float32_vae = diffusers.AutoencoderKL.from_pretrained(fp16_checkpoint / "vae", variant="fp16", torch_dtype=torch.float32)
    expected = float32_vae.decode(latents.float() / float32_vae.config.scaling_factor).sample
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    # The whole float16 pipeline agrees with the reference's float16 pipeline (which upcasts the same way).
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(fp16_checkpoint, variant="fp16", torch_dtype=torch.float16)
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(ours, prompt="a cat").images, generate(reference, prompt="a cat").images, atol=5e-3, rtol=0)


def test_replacement_vae_fixed_for_float16_stays_float16(fp16_checkpoint):
    from gesso.nn import AutoencoderKL
    from gesso.weights import find_weight_files

    folder = fp16_checkpoint / "vae"
    config = {**AutoencoderKL.load_config(folder), "force_upcast": False}  # as published "fp16-fix" VAEs are
    fixed = AutoencoderKL.from_config_and_files(
        config, find_weight_files(folder, AutoencoderKL.weights_base_name, "fp16", None), torch_dtype=torch.float16
    )
    assert fixed.config.force_upcast is False
    ours = AutoPipelineForText2Image.from_pretrained(fp16_checkpoint, variant="fp16", torch_dtype=torch.float16, vae=fixed)
    assert ours.vae is fixed
    seen, hook = decoder_dtypes(ours)
    try:
        result = generate(ours, prompt="a cat", num_inference_steps=2, output_type="pt")
    finally:
        hook.remove()
    assert seen == [torch.float16]
    assert result.images.shape == (1, 3, 32, 32) and torch.isfinite(result.images).all()


def test_nan_decode_is_an_error_not_a_black_image(checkpoint):
    from gesso.nn import AutoencoderKL

    broken = AutoencoderKL.from_pretrained(checkpoint / "vae")
    with torch.no_grad():
        broken.decoder.conv_out.bias[0] = float("nan")
    ours = AutoPipelineForText2Image.from_pretrained(checkpoint, vae=broken)
    for output_type in ("pil", "np"):
        with pytest.raises(ValueError, match="the VAE decoded NaN values.*float16.*float32"):
            generate(ours, prompt="a cat", num_inference_steps=1, output_type=output_type)
    assert generate(ours, prompt="a cat", num_inference_steps=1, output_type="latent").images.isfinite().all()


def test_reference_guide_snippet(tmp_path):
    """The reference guide's SDXL snippet, with gesso in place of the reference, on a local tiny checkpoint."""
    from gesso_sdxl.tiny import write_tiny_checkpoint
    from PIL import Image

    folder = write_tiny_checkpoint(tmp_path / "sdxl")
    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float32)
    image = pipeline(
        "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k", generator=torch.Generator("cpu").manual_seed(31)
    ).images[0]
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    assert isinstance(image, Image.Image)
    assert image.size == (size, size)
    assert pipeline.num_timesteps == 50 and pipeline.guidance_scale == 5.0


def test_sdxl_vae_full_size():
    """The published SDXL VAE config (four levels, 83M parameters) on a small input."""
    import diffusers
    from gesso.nn import AutoencoderKL

    published = json.loads((Path(__file__).parents[1] / "data" / "full-size-architectures.json").read_text())["sdxl"]["vae"]
    config = {k: v for k, v in published.items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config)
    reference = reference.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.ndim == 1:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.05 * torch.randn(param.shape, generator=generator))
            else:
                param.normal_(0.0, 0.02, generator=generator)
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ours.eval()
    assert ours.config.force_upcast is True and ours.config.scaling_factor == 0.13025
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        expected = reference.decode(latents).sample
        actual = ours.decode(latents).sample
        image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
        expected_mean = reference.encode(image).latent_dist.mean
        actual_mean = ours.encode(image).latent_dist.mean
    for mine, theirs in ((actual, expected), (actual_mean, expected_mean)):
        assert theirs.abs().max() > 0
        scale = max(theirs.abs().max().item(), 1.0)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * scale)


def test_float32_vae_in_a_float16_pipeline(fp16_checkpoint):
    """A VAE kept in float32 (the family's ``float32_when`` policy) decodes float16 latents as they are."""
    ours = AutoPipelineForText2Image.from_pretrained(fp16_checkpoint, variant="fp16", torch_dtype=torch.float16)
    ours.vae.to(torch.float32)
    seen, hook = decoder_dtypes(ours)
    try:
        result = generate(ours, prompt="a cat", num_inference_steps=2, output_type="pt")
    finally:
        hook.remove()
    assert ours.unet.dtype == torch.float16 and ours.vae.dtype == torch.float32
    assert seen == [torch.float32] and torch.isfinite(result.images).all()
