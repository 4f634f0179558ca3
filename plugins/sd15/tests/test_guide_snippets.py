"""The reference text-to-image guide's SD1.5 snippets, with gesso in place of the reference library.

They run on the CPU against a local tiny checkpoint (float32 instead of float16, a CPU generator
instead of a CUDA one, and few steps to keep the suite short); everything else is as written there.
"""

from __future__ import annotations

import pytest
import torch
from gesso import AutoPipelineForText2Image
from PIL import Image

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gesso_sd15.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("guide-sd15"), variant="fp16")


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return AutoPipelineForText2Image.from_pretrained(checkpoint, torch_dtype=torch.float32, variant="fp16").to("cpu")


def test_load_and_generate(pipeline):
    image = pipeline(
        "stained glass of darth vader, backlight, centered composition, masterpiece, photorealistic, 8k", num_inference_steps=2
    ).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_generator_makes_it_reproducible(pipeline):
    first = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(31), num_inference_steps=2).images[0]
    again = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(31), num_inference_steps=2).images[0]
    other = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(30), num_inference_steps=2).images[0]
    assert first.tobytes() == again.tobytes() != other.tobytes()


def test_height_width_guidance_and_negative_prompt(pipeline):
    assert pipeline(PROMPT, height=48, width=32, num_inference_steps=2).images[0].size == (32, 48)
    base = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2).images[0]
    lower = pipeline(PROMPT, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2).images[0]
    negative = pipeline(
        prompt=PROMPT,
        negative_prompt="ugly, deformed, disfigured, poor details, bad anatomy",
        generator=torch.Generator("cpu").manual_seed(0),
        num_inference_steps=2,
    ).images[0]
    assert base.tobytes() != lower.tobytes() and base.tobytes() != negative.tobytes()


def test_prompt_weighting_embeddings(pipeline):
    prompt_embeds, negative_prompt_embeds = pipeline.encode_prompt(PROMPT, torch.device("cpu"), 1, True, "blurry")
    from_embeds = pipeline(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        generator=torch.Generator("cpu").manual_seed(0),
        num_inference_steps=2,
    ).images[0]
    from_text = pipeline(PROMPT, negative_prompt="blurry", generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2).images[0]
    assert from_embeds.tobytes() == from_text.tobytes()


def test_compiled_unet_can_replace_the_component(checkpoint):
    """``pipeline.unet = torch.compile(pipeline.unet, ..., fullgraph=True)``: the whole UNet traces as
    one graph and the compiled module works in its place (the eager backend keeps the CPU run short).
    Compiled, the GroupNorms reduce their statistics in chunks (``gesso.nn.normalization``): the
    same values up to float32 rounding, far below one level of an 8-bit image."""
    pipeline = AutoPipelineForText2Image.from_pretrained(checkpoint, torch_dtype=torch.float32, variant="fp16")
    expected = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2, output_type="np").images
    pipeline.unet = torch.compile(pipeline.unet, backend="eager", fullgraph=True)
    actual = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2, output_type="np").images
    assert abs(actual - expected).max() < 1e-4
