"""ControlNet: same checkpoints, arguments and seed give the reference's image (float32, CPU).

Base pipelines and ControlNets are written by the reference's own ``save_pretrained``; gesso loads
them with ``AutoPipelineForText2Image.from_pretrained(base, controlnet=...)`` and is compared with
the reference's ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image, ControlNetModel

from tests.parity.helpers import generate
from tests.parity.reference_checkpoints import write_reference_sd15
from tests.parity.reference_controlnet import pose_image, write_reference_controlnet

ATOL = 1e-3  # per pixel on [0, 1]


def assert_same(ours, reference, **kwargs):
    expected = generate(reference, **dict(kwargs))
    actual = generate(ours, **dict(kwargs))
    assert actual.images.shape == expected.images.shape
    np.testing.assert_allclose(actual.images, expected.images, atol=ATOL, rtol=0)
    return actual.images


# -- SD1.5 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("controlnet-sd15")
    base = write_reference_sd15(root / "base", safety_checker=False)
    first = write_reference_controlnet(root / "pose", seed=1)
    second = write_reference_controlnet(root / "edges", seed=2, controlnet_conditioning_channel_order="bgr")
    ref_nets = [diffusers.ControlNetModel.from_pretrained(p) for p in (first, second)]
    our_nets = [ControlNetModel.from_pretrained(p) for p in (first, second)]
    pipelines = {}
    for key, ref_value, our_value in (("one", ref_nets[0], our_nets[0]), ("two", ref_nets, our_nets)):
        reference = diffusers.StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=ref_value, safety_checker=None)
        reference.set_progress_bar_config(disable=True)
        pipelines[key] = (AutoPipelineForText2Image.from_pretrained(base, controlnet=our_value), reference)
    return pipelines


POSE = pose_image(48, 40)
EDGES = pose_image(48, 40, shift=0.15).convert("L")

SD15_CASES = {
    "one net, size from the image": ("one", {"prompt": "a dancer", "image": POSE}),
    "size rounded down to the VAE scale": ("one", {"prompt": "a dancer", "image": pose_image(49, 41)}),
    "explicit size and scale": (
        "one",
        {"prompt": "a dancer", "image": POSE, "height": 32, "width": 40, "controlnet_conditioning_scale": 0.6},
    ),
    "guess mode": ("one", {"prompt": "a dancer", "image": POSE, "guess_mode": True}),
    "partial guidance window": ("one", {"prompt": "a dancer", "image": POSE, "control_guidance_start": 0.25, "control_guidance_end": 0.75}),
    "batch, numpy image, images per prompt": (
        "one",
        {
            "prompt": ["a dancer", "a robot"],
            "image": np.asarray(POSE, dtype=np.float32)[None] / 255,
            "num_images_per_prompt": 2,
            "num_inference_steps": 2,
        },
    ),
    "one image per prompt as tensors": (
        "one",
        {
            "prompt": ["a dancer", "a robot"],
            "image": [torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)],
            "num_inference_steps": 2,
        },
    ),
    "no guidance": ("one", {"prompt": "a dancer", "image": POSE, "guidance_scale": 1.0}),
    "two nets": ("two", {"prompt": "a dancer", "image": [POSE, EDGES], "controlnet_conditioning_scale": [0.8, 0.5]}),
    "two nets, guess mode": ("two", {"prompt": "a dancer", "image": [POSE, EDGES], "guess_mode": True}),
    "two nets, one window each": (
        "two",
        {"prompt": "a dancer", "image": [POSE, EDGES], "control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]},
    ),
}


@pytest.mark.parametrize("case", SD15_CASES, ids=list(SD15_CASES))
def test_sd15_same_image_as_reference(sd15, case):
    key, kwargs = SD15_CASES[case]
    ours, reference = sd15[key]
    assert_same(ours, reference, **kwargs)


def test_sd15_control_changes_the_image(sd15):
    """The comparisons above are not vacuous: the control image, the window and guess mode all matter."""
    ours, _ = sd15["one"]
    plain = generate(ours, prompt="a dancer", image=POSE).images
    for other in (
        {"image": pose_image(48, 40, shift=0.2)},
        {"image": POSE, "control_guidance_start": 0.5},
        {"image": POSE, "guess_mode": True},
    ):
        changed = generate(ours, prompt="a dancer", **{**other}).images
        assert np.abs(changed - plain).max() > 1e-2, other
    assert plain.shape == (1, 40, 48, 3)


def test_sd15_pipeline_exposes_the_nets(sd15):
    from gesso_controlnet.model import MultiControlNetModel

    one, _ = sd15["one"]
    two, _ = sd15["two"]
    assert isinstance(one.controlnet, ControlNetModel.implementation())
    assert isinstance(two.controlnet, MultiControlNetModel) and len(two.controlnet.nets) == 2
    assert two.controlnet.nets[1].config.controlnet_conditioning_channel_order == "bgr"


ERROR_CASES = {
    "wrong image type": ("one", {"image": "pose.png"}),
    "missing image": ("one", {}),
    "image batch differs from prompts": ("one", {"prompt": ["a", "b", "c"], "image": [POSE, POSE]}),
    "integer scale for one net": ("one", {"image": POSE, "controlnet_conditioning_scale": 1}),
    "start after end": ("one", {"image": POSE, "control_guidance_start": 0.8, "control_guidance_end": 0.2}),
    "end above one": ("one", {"image": POSE, "control_guidance_end": 1.5}),
    "negative start": ("one", {"image": POSE, "control_guidance_start": -0.1}),
    "window lists of different lengths": (
        "two",
        {"image": [POSE, POSE], "control_guidance_start": [0.0, 0.1], "control_guidance_end": [0.5, 0.6, 0.9]},
    ),
    "one window for two nets": ("two", {"image": [POSE, POSE], "control_guidance_start": [0.1], "control_guidance_end": [0.9]}),
    "two nets, one image": ("two", {"image": POSE}),
    "two nets, three images": ("two", {"image": [POSE, POSE, POSE]}),
    "nested scales": ("two", {"image": [POSE, POSE], "controlnet_conditioning_scale": [[1.0, 0.5], [0.2, 0.8]]}),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_sd15_bad_arguments_raise_like_reference(sd15, case):
    key, kwargs = ERROR_CASES[case]
    ours, reference = sd15[key]
    kwargs = {"prompt": "a dancer", **kwargs}
    with pytest.raises((TypeError, ValueError)) as expected:
        generate(reference, **dict(kwargs), num_inference_steps=1)
    with pytest.raises(expected.type):
        generate(ours, **dict(kwargs), num_inference_steps=1)


def test_guide_snippet_pose_conditioning(tmp_path):
    """The reference guide's ControlNet example, on local tiny fp16 checkpoints and a generated pose."""
    import diffusers

    base = write_reference_sd15(tmp_path / "sd15", variant="fp16", safety_checker=False)
    net = write_reference_controlnet(tmp_path / "openpose", variant="fp16")
    device, pose = "cpu", pose_image(48, 40)
    results = []
    for library in (__import__("gesso"), diffusers):
        controlnet = library.ControlNetModel.from_pretrained(str(net), torch_dtype=torch.float16, variant="fp16").to(device)
        pipeline = library.AutoPipelineForText2Image.from_pretrained(
            str(base), controlnet=controlnet, torch_dtype=torch.float16, variant="fp16"
        ).to(device)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device).manual_seed(31)
        image = pipeline(
            "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k", image=pose, generator=generator, num_inference_steps=4
        ).images[0]
        results.append(image)
    ours, expected = results
    assert ours.size == expected.size == pose.size
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max()
    assert difference <= 2, difference  # float16 on both sides: the same image up to rounding


# -- SDXL ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    import diffusers
    from gesso_controlnet.tiny import SDXL_CONFIG

    from tests.parity.reference_sdxl import write_reference_sdxl

    root = tmp_path_factory.mktemp("controlnet-sdxl")
    base = write_reference_sdxl(root / "base")
    paths = [write_reference_controlnet(root / f"net{i}", config=SDXL_CONFIG, seed=10 + i) for i in range(2)]
    ref_nets = [diffusers.ControlNetModel.from_pretrained(p) for p in paths]
    our_nets = [ControlNetModel.from_pretrained(p) for p in paths]
    pipelines = {}
    for key, ref_value, our_value in (("one", ref_nets[0], our_nets[0]), ("two", ref_nets, our_nets)):
        reference = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=ref_value, add_watermarker=False)
        reference.set_progress_bar_config(disable=True)
        ours = AutoPipelineForText2Image.from_pretrained(base, controlnet=our_value)
        assert ours.family == "sdxl"
        pipelines[key] = (ours, reference)
    return pipelines


SDXL_CASES = {
    "one net": ("one", {"prompt": "a dancer", "image": POSE}),
    "one net, batch and images per prompt": (
        "one",
        {"prompt": ["a dancer", "a robot"], "image": POSE, "num_images_per_prompt": 2, "num_inference_steps": 2},
    ),
    "guess mode": ("one", {"prompt": "a dancer", "image": POSE, "guess_mode": True, "controlnet_conditioning_scale": 0.7}),
    "partial guidance window": ("one", {"prompt": "a dancer", "image": POSE, "control_guidance_start": 0.2, "control_guidance_end": 0.6}),
    "two nets": ("two", {"prompt": "a dancer", "image": [POSE, EDGES], "controlnet_conditioning_scale": [1.0, 0.6]}),
    "two nets, guess mode, windows": (
        "two",
        {
            "prompt": "a dancer",
            "image": [POSE, EDGES],
            "guess_mode": True,
            "control_guidance_start": [0.0, 0.25],
            "control_guidance_end": [0.75, 1.0],
        },
    ),
}


@pytest.mark.parametrize("case", SDXL_CASES, ids=list(SDXL_CASES))
def test_sdxl_same_image_as_reference(sdxl, case):
    key, kwargs = SDXL_CASES[case]
    ours, reference = sdxl[key]
    assert_same(ours, reference, **kwargs)


def test_sdxl_net_uses_the_added_conditioning(sdxl):
    """The SDXL net reads ``text_embeds`` / ``time_ids``: other time ids change its residuals."""
    ours, _ = sdxl["one"]
    net = ours.controlnet
    g = torch.Generator().manual_seed(4)
    x = dict(
        sample=torch.randn(1, 4, 20, 24, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
        controlnet_cond=torch.rand(1, 3, 40, 48, generator=g),
    )
    text = torch.randn(1, 32, generator=g)
    first = net(**x, added_cond_kwargs={"text_embeds": text, "time_ids": torch.tensor([[40.0, 48, 0, 0, 40, 48]])}, return_dict=False)[1]
    other = net(**x, added_cond_kwargs={"text_embeds": text, "time_ids": torch.tensor([[80.0, 96, 0, 0, 40, 48]])}, return_dict=False)[1]
    assert not torch.allclose(first, other, atol=1e-4)
    with pytest.raises(ValueError, match="time_ids"):
        net(**x, added_cond_kwargs={"text_embeds": text})


# -- component parity at the published SD1.5 size -------------------------------------------------
@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd15_controlnet_matches_reference():
    import json
    from pathlib import Path

    import diffusers
    from gesso_controlnet.model import ControlNetModel as OurControlNet

    data = json.loads((Path(__file__).resolve().parents[1] / "data" / "full-size-architectures.json").read_text())
    config = {k: v for k, v in data["controlnet_sd15"]["controlnet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = diffusers.ControlNetModel(**config)
    reference = reference.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    for name, param in reference.named_parameters():
        if param.ndim == 1:
            param.fill_(1.0) if name.endswith("weight") and "norm" in name else param.normal_(0.0, 0.02, generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    with torch.device("meta"):
        ours = OurControlNet.from_config(config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 361279120
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        sample=torch.randn(1, 4, 8, 8, generator=g),
        timestep=torch.tensor([801]),
        encoder_hidden_states=torch.randn(1, 4, 768, generator=g),
        controlnet_cond=torch.rand(1, 3, 64, 64, generator=g),
        conditioning_scale=0.9,
    )
    for guess_mode in (False, True):
        expected = reference(**inputs, guess_mode=guess_mode, return_dict=False)
        actual = ours(**inputs, guess_mode=guess_mode, return_dict=False)
        assert len(actual[0]) == len(expected[0]) == 12
        for a, e in zip([*actual[0], actual[1]], [*expected[0], expected[1]]):
            scale = max(e.abs().max().item(), 1.0)
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * scale)
            assert e.abs().max() > 0
    del reference, ours
    gc.collect()
