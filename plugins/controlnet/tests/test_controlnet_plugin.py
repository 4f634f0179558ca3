"""gesso-controlnet on its own: registration, loading, run configs and the CLI, control-image preparation.

Image parity with the reference pipelines is in ``tests/parity/test_controlnet_parity.py``; here the
base checkpoint is the sd15 family's own tiny one and the nets are written by gesso.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gesso
import numpy as np
import PIL.Image
import pytest
import torch
from gesso import AutoPipelineForText2Image, ControlNetModel
from gesso.config import ConfigError
from gesso_controlnet import images as control_images
from gesso_controlnet.model import MultiControlNetModel
from gesso_controlnet.tiny import write_tiny_controlnet


def pose(width: int = 48, height: int = 40, seed: int = 0) -> PIL.Image.Image:
    """Coloured strokes on black, a stand-in for an OpenPose rendering."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 12)
        array[y : y + 3, x : x + 12] = rng.integers(64, 256, size=3)
    return PIL.Image.fromarray(array)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gesso_sd15.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("controlnet-plugin")
    base = write_tiny_checkpoint(root / "base")
    nets = [write_tiny_controlnet(root / f"net{i}", seed=i) for i in range(2)]
    write_tiny_controlnet(root / "net0-fp16", seed=0, variant="fp16")
    images = []
    for i in range(2):
        path = root / f"pose{i}.png"
        pose(seed=i).save(path)
        images.append(path)
    return {"root": root, "base": base, "nets": nets, "images": images}


def run_config(files, tmp_path, **extra):
    return {
        "model": str(files["base"]),
        "prompt": "a dancer",
        "seed": 5,
        "num_inference_steps": 2,
        "output": {"dir": str(tmp_path / "out")},
        **extra,
    }


def python_api(files, nets, images, **call):
    pipeline = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=nets)
    opened = [PIL.Image.open(p).convert("RGB") for p in images] if isinstance(images, list) else PIL.Image.open(images).convert("RGB")
    return pipeline("a dancer", image=opened, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(5), **call).images[0]


def assert_same_pixels(a, b):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# -- registration and loading ----------------------------------------------------------------------
def test_plugin_registers_component_and_conditioner():
    from gesso.plugins import get_host

    registry = get_host().registry
    assert registry.components[("diffusers", "ControlNetModel")].load_class() is ControlNetModel.implementation()
    spec = registry.conditioners["controlnet"]
    assert spec.families == ("sd15", "sdxl") and spec.pipeline_argument == "controlnet"
    assert dict(spec.config_keys) == {
        "image": None,
        "controlnet_conditioning_scale": 1.0,
        "guess_mode": False,
        "control_guidance_start": 0.0,
        "control_guidance_end": 1.0,
    }


def test_from_pretrained_dtype_variant_and_round_trip(files, tmp_path):
    net = ControlNetModel.from_pretrained(files["root"] / "net0-fp16", torch_dtype=torch.float16, variant="fp16")
    assert net.dtype == torch.float16
    full = ControlNetModel.from_pretrained(files["nets"][0])
    torch.testing.assert_close(net.controlnet_mid_block.weight.float(), full.controlnet_mid_block.weight, atol=1e-3, rtol=0)
    full.save_pretrained(tmp_path / "again")
    again = ControlNetModel.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    names = set(full.state_dict())
    assert {
        "controlnet_cond_embedding.conv_in.weight",
        "controlnet_down_blocks.0.weight",
        "controlnet_mid_block.weight",
        "conv_in.weight",
    } <= names
    assert len([n for n in names if n.startswith("controlnet_down_blocks.") and n.endswith(".weight")]) == 6


def test_multi_controlnet_save_and_load(files, tmp_path):
    nets = [ControlNetModel.from_pretrained(p) for p in files["nets"]]
    multi = MultiControlNetModel(nets)
    multi.save_pretrained(tmp_path / "multi")
    assert (tmp_path / "multi_1" / "config.json").is_file()
    loaded = MultiControlNetModel.from_pretrained(tmp_path / "multi")
    assert len(loaded.nets) == 2
    assert torch.equal(loaded.nets[1].conv_in.weight, nets[1].conv_in.weight)


def test_attaching_sets_pipeline_controlnet_and_moves_with_the_pipeline(files):
    net = ControlNetModel.from_pretrained(files["nets"][0])
    pipeline = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=net)
    assert pipeline.controlnet is net and len(pipeline.conditioners) == 1
    pipeline.to(torch.float64)
    assert net.dtype == torch.float64 and pipeline.unet.dtype == torch.float64
    multi = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=[ControlNetModel.from_pretrained(p) for p in files["nets"]])
    assert isinstance(multi.controlnet, MultiControlNetModel)
    assert AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=None).conditioners == []
    with pytest.raises(TypeError, match="ControlNetModel"):
        AutoPipelineForText2Image.from_pretrained(files["base"], controlnet="not a model")


def test_device_map_places_a_passed_controlnet_with_the_pipeline(files, monkeypatch):
    net = ControlNetModel.from_pretrained(files["nets"][0])
    moves = []
    move = net.to
    monkeypatch.setattr(net, "to", lambda *args, **kwargs: moves.append(args) or move(*args, **kwargs))
    AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=net, device_map="cpu")
    assert moves == [(torch.device("cpu"),)]


def test_residuals_reach_the_unet(files):
    """Scale 0 equals a run without the net; scale 1 differs: the residuals are really added."""
    net = ControlNetModel.from_pretrained(files["nets"][0])
    with_net = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=net)
    plain = AutoPipelineForText2Image.from_pretrained(files["base"])
    call = dict(prompt="a dancer", num_inference_steps=2, output_type="np", height=40, width=48)
    base = plain(**call, generator=torch.Generator().manual_seed(1)).images
    off = with_net(**call, image=pose(), controlnet_conditioning_scale=0.0, generator=torch.Generator().manual_seed(1)).images
    on = with_net(**call, image=pose(), generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(off, base, atol=1e-6, rtol=0)
    assert np.abs(on - base).max() > 1e-2


def test_offload_lends_the_controlnet_together_with_the_unet(files):
    """The net runs at every step beside the UNet: it visits the device with it and leaves with it."""
    from gesso.optimize.offload import model_cpu_offload
    from gesso.plugins import get_host

    call = dict(prompt="a dancer", image=pose(), num_inference_steps=2, output_type="np", height=40, width=48)
    plain = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=ControlNetModel.from_pretrained(files["nets"][0]))
    expected = plain(**call, generator=torch.Generator().manual_seed(1)).images
    pipeline = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=ControlNetModel.from_pretrained(files["nets"][0]))
    chain = model_cpu_offload(pipeline, get_host().registry.families["sd15"].execution_policy, "cpu")
    events = []
    for name in ("text_encoder", "unet", "controlnet", "vae"):
        weights = chain.weights[id(getattr(pipeline, name))]
        lend, take_back = weights.lend, weights.take_back
        weights.lend = lambda device, name=name, lend=lend: (events.append(("lend", name)), lend(device))[1]
        weights.take_back = lambda name=name, take_back=take_back: (events.append(("back", name)), take_back())[1]

    images = pipeline(**call, generator=torch.Generator().manual_seed(1)).images

    np.testing.assert_array_equal(images, expected)
    assert events[events.index(("lend", "controlnet")) - 1] == ("lend", "unet")
    back = events.index(("back", "controlnet"))
    assert events[back - 1 : back + 2] == [("back", "unet"), ("back", "controlnet"), ("lend", "vae")]
    assert events.count(("lend", "controlnet")) == 1  # not lent again at each step


# -- run configs and the CLI ---------------------------------------------------------------------
def test_run_config_matches_python_api(files, tmp_path):
    result = gesso.run(run_config(files, tmp_path, controlnet=str(files["nets"][0]), image=str(files["images"][0])))
    assert_same_pixels(result.images[0], python_api(files, ControlNetModel.from_pretrained(files["nets"][0]), files["images"][0]))
    assert result.images[0].size == (48, 40)  # the control image's size
    recorded = PIL.Image.open(result.paths[0]).text["gesso"]
    assert f"controlnet: {files['nets'][0]}" in recorded and "controlnet_conditioning_scale: 1.0" in recorded


def test_run_config_with_two_nets_and_options(files, tmp_path):
    config = run_config(
        files,
        tmp_path,
        controlnet=[str(p) for p in files["nets"]],
        image=[str(p) for p in files["images"]],
        controlnet_conditioning_scale=[1, 0.5],
        guess_mode=True,
        control_guidance_end=[1.0, 0.5],
    )
    result = gesso.run(config)
    nets = [ControlNetModel.from_pretrained(p) for p in files["nets"]]
    expected = python_api(
        files, nets, files["images"], controlnet_conditioning_scale=[1.0, 0.5], guess_mode=True, control_guidance_end=[1.0, 0.5]
    )
    assert_same_pixels(result.images[0], expected)


def test_run_config_errors_name_the_key(files, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'controlnet_conditioning_scale'"):
        gesso.run(run_config(files, tmp_path, controlnet=str(files["nets"][0]), controlnet_conditioning_scal=0.5))
    with pytest.raises(ConfigError, match="image: file"):
        gesso.run(run_config(files, tmp_path, controlnet=str(files["nets"][0]), image=str(tmp_path / "missing.png")))


def test_cli_generate_with_controlnet(files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "gesso",
        "generate",
        "a dancer",
        "--model",
        str(files["base"]),
        "--out",
        "cli",
        "seed=5",
        "num_inference_steps=2",
        f"controlnet={files['nets'][0]}",
        f"image={files['images'][0]}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    written = PIL.Image.open(tmp_path / "cli" / "00000.png")
    assert_same_pixels(written.convert("RGB"), python_api(files, ControlNetModel.from_pretrained(files["nets"][0]), files["images"][0]))


# -- control images --------------------------------------------------------------------------------
def _reference_processor():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)


IMAGE_INPUTS = {
    "PIL RGB": lambda: pose(50, 37),
    "PIL RGBA": lambda: pose(50, 37).convert("RGBA"),
    "PIL greyscale": lambda: pose(50, 37).convert("L"),
    "list of PIL": lambda: [pose(50, 37, seed=1), pose(50, 37, seed=2)],
    "numpy HWC": lambda: np.random.default_rng(0).random((37, 50, 3), dtype=np.float32),
    "numpy NHWC": lambda: np.random.default_rng(0).random((2, 37, 50, 3), dtype=np.float32),
    "numpy HW": lambda: np.random.default_rng(0).random((37, 50), dtype=np.float32),
    "list of numpy": lambda: [np.random.default_rng(i).random((37, 50, 3), dtype=np.float32) for i in range(2)],
    "tensor CHW": lambda: torch.rand(3, 37, 50, generator=torch.Generator().manual_seed(0)),
    "tensor NCHW": lambda: torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(0)),
    "list of tensors": lambda: [torch.rand(3, 37, 50, generator=torch.Generator().manual_seed(i)) for i in range(2)],
    "latent-shaped tensor": lambda: torch.rand(1, 4, 37, 50, generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("name", IMAGE_INPUTS, ids=list(IMAGE_INPUTS))
@pytest.mark.parametrize("size", [None, (48, 64)], ids=["natural size", "given size"])
def test_control_image_preparation_matches_reference(name, size):
    processor = _reference_processor()
    image = IMAGE_INPUTS[name]()
    height, width = size or control_images.natural_size(image, 8)
    expected = processor.preprocess(image, height=size and size[0], width=size and size[1]).to(torch.float32)
    actual = control_images.preprocess(image, height, width)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_bad_image_types_are_refused_before_anything_runs(files):
    pipeline = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=ControlNetModel.from_pretrained(files["nets"][0]))
    for bad in ("pose.png", 3, [1, 2], None):
        with pytest.raises(TypeError, match="image must be passed"):
            pipeline("a dancer", image=bad, num_inference_steps=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'controlnet_scale'"):
        pipeline("a dancer", image=pose(), controlnet_scale=0.5, num_inference_steps=1)


def test_fused_time_projections_reach_every_net_and_give_the_same_image(files):
    """``fuse_time_projections`` fuses each net of a MultiControlNet as well as the UNet."""
    from gesso.runner import optimize

    def image(pipeline):
        opened = [pose(seed=i) for i in range(2)]
        call = dict(prompt="a dancer", num_inference_steps=2, output_type="np", height=40, width=48)
        return pipeline(**call, image=opened, generator=torch.Generator().manual_seed(1)).images

    def pipeline():
        nets = [ControlNetModel.from_pretrained(path) for path in files["nets"]]
        return AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=nets)

    plain, fused = pipeline(), pipeline()
    optimize(fused, ["fuse_time_projections"])
    assert fused.unet.time_projections is not None
    assert all(net.time_projections is not None for net in fused.controlnet.nets)
    np.testing.assert_allclose(image(fused), image(plain), atol=1e-5, rtol=0)


def test_a_scale_of_one_launches_no_multiplications_and_gives_the_same_residuals(files):
    """Every step of a plain ControlNet run has scale 1.0: multiplying 13 residuals by it is 13 kernels for nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMultiplications(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.mul:
                CountMultiplications.count += 1
            return func(*args, **(kwargs or {}))

    net = ControlNetModel.from_pretrained(files["nets"][0])
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, net.config.cross_attention_dim, generator=generator)
    side = 8 * 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)  # the embedding halves the image at each stage
    control = torch.rand(2, 3, side, side, generator=generator)

    def residuals(scale):
        CountMultiplications.count = 0
        with torch.no_grad(), CountMultiplications():
            down, mid = net(sample, 10, hidden, control, conditioning_scale=scale, return_dict=False)
        return [*down, mid], CountMultiplications.count

    (at_one, multiplications_at_one), (near_one, multiplications_near_one) = residuals(1.0), residuals(1.0 + 2**-20)
    assert multiplications_near_one - multiplications_at_one == len(at_one)
    for a, b in zip(at_one, near_one):
        torch.testing.assert_close(a * (1.0 + 2**-20), b)
