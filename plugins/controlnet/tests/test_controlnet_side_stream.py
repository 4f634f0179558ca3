"""``controlnet_side_stream``: the UNet runs the ControlNet inside its own call.

On a CUDA device the net's kernels go to a second stream (tests/gpu checks the images there). What
can go wrong on any device is the plumbing: each step must hand the UNet the net's arguments of
that step (scale window, guess mode, several nets), and the net's once-an-image work must still
follow each image although the UNet calls the net beneath those wrappers. Here the optimization is
applied by its function, as it is CUDA-only through ``optimize``; without a CUDA device the UNet
runs the net first, the same code path less the streams.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from controlnet_cases import control_image, write_base_and_nets
from gesso import AutoPipelineForText2Image, ControlNetModel
from gesso.config import ConfigError, presets
from gesso.contract import ExecutionPolicy
from gesso.optimize import wrapper_chain
from gesso.plugins import get_host
from gesso.runner import optimize
from gesso_controlnet.optimize import ControlEmbeddingOnce
from gesso_controlnet.side_stream import ControlNetAlongside, controlnet_side_stream
from gesso_controlnet.tiny import write_tiny_controlnet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_base_and_nets(tmp_path_factory.mktemp("controlnet-side-stream"))


def pipeline(files, *optimizations, side_stream=False, nets=1):
    loaded = [ControlNetModel.from_pretrained(path) for path in files["nets"][:nets]]
    built = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=loaded if nets > 1 else loaded[0])
    optimize(built, list(optimizations))
    if side_stream:
        controlnet_side_stream(built, get_host().registry.families["sd15"].execution_policy)
    return built


def images(pipeline, seeds, steps=3, **call):
    image = [control_image(s) for s in seeds] if len(seeds) > 1 else control_image(seeds[0])
    call = dict(prompt="a dancer", num_inference_steps=steps, output_type="np", height=40, width=48, **call)
    return pipeline(**call, image=image, generator=torch.Generator().manual_seed(1)).images


def embedder(net):
    """The ``ControlEmbeddingOnce`` among the wrappers of ``net.forward``."""
    return next(forward for forward in wrapper_chain(net.forward) if isinstance(forward, ControlEmbeddingOnce))


def test_the_unet_runs_the_net_of_each_step_and_gives_the_images_of_the_net_run_first(files):
    plain, alongside = pipeline(files), pipeline(files, side_stream=True)
    assert isinstance(alongside.unet.forward, ControlNetAlongside)
    net_calls, unet_calls = [], []
    alongside.controlnet.conv_in.register_forward_hook(lambda *_: net_calls.append(1))
    alongside.unet.conv_in.register_forward_hook(lambda *_: unet_calls.append(len(net_calls)))
    np.testing.assert_allclose(images(alongside, [0], steps=4), images(plain, [0], steps=4), atol=1e-6, rtol=0)
    # one net call a step (PNDM makes 5 for 4 steps), made inside the UNet's call, before its blocks
    assert len(unet_calls) >= 4 and unet_calls == list(range(1, len(unet_calls) + 1))


def test_arguments_that_change_over_the_steps_or_per_call_reach_the_net(files):
    plain, alongside = pipeline(files), pipeline(files, side_stream=True)
    for call in (
        dict(control_guidance_start=0.3, control_guidance_end=0.7),  # the net's scale is 0 outside the window
        dict(guess_mode=True),  # the net sees the conditional half only
        dict(controlnet_conditioning_scale=0.4),
    ):
        np.testing.assert_allclose(images(alongside, [2], steps=4, **call), images(plain, [2], steps=4, **call), atol=1e-6, rtol=0)


def test_each_image_gets_its_own_control_embedding_though_the_unet_calls_the_net_beneath_its_wrapper(files):
    """``control_embedding_once`` wraps the net's forward, which the UNet does not call: the UNet's
    wrapper does that work in its own call (before each replay, under graphs), so a new image is
    embedded anew."""
    plain = pipeline(files)
    alongside = pipeline(files, "control_embedding_once", "cross_kv_once", side_stream=True)
    embeddings = []
    alongside.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: embeddings.append(1))
    for count, seed in enumerate([0, 1, 0], start=1):
        np.testing.assert_allclose(images(alongside, [seed]), images(plain, [seed]), atol=1e-6, rtol=0)
        assert embedder(alongside.controlnet).embeddings == len(embeddings) == count  # once an image, not at each step


def test_several_nets_each_with_its_image(files):
    plain = pipeline(files, nets=2)
    alongside = pipeline(files, "control_embedding_once", side_stream=True, nets=2)
    for seeds in ([0, 1], [1, 0]):
        np.testing.assert_allclose(images(alongside, seeds), images(plain, seeds), atol=1e-6, rtol=0)


def test_sdxl_nets_get_their_added_conditioning_through_the_unet(tmp_path):
    """SDXL's nets also take the pooled text embedding and the size ids, now passed by the UNet's call."""
    from gesso_controlnet.tiny import SDXL_CONFIG
    from gesso_sdxl.tiny import write_tiny_checkpoint

    base, net = write_tiny_checkpoint(tmp_path / "base"), write_tiny_controlnet(tmp_path / "net", config=SDXL_CONFIG, seed=3)
    built = {}
    for side_stream in (False, True):
        built[side_stream] = AutoPipelineForText2Image.from_pretrained(base, controlnet=ControlNetModel.from_pretrained(net))
        if side_stream:
            controlnet_side_stream(built[side_stream], get_host().registry.families["sdxl"].execution_policy)
    assert built[True].family == "sdxl" and isinstance(built[True].unet.forward, ControlNetAlongside)
    for call in ({}, dict(guess_mode=True)):
        np.testing.assert_allclose(images(built[True], [4], **call), images(built[False], [4], **call), atol=1e-6, rtol=0)


def test_the_unet_called_without_a_net_call_is_the_plain_unet(files):
    alongside = pipeline(files, side_stream=True)
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 5, 6, generator=generator), torch.randn(2, 77, alongside.unet.config.cross_attention_dim)
    with torch.no_grad():
        got = alongside.unet(sample, 10, hidden, return_dict=False)[0]
        expected = alongside.unet.forward.forward(sample, 10, hidden, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_it_applies_once_and_leaves_pipelines_without_a_controlnet_alone(files, caplog):
    twice = pipeline(files, side_stream=True)
    controlnet_side_stream(twice, ExecutionPolicy(hot_loop=("unet",)))
    assert not isinstance(twice.unet.forward.forward, ControlNetAlongside)
    without = AutoPipelineForText2Image.from_pretrained(files["base"])
    with caplog.at_level("INFO", logger="gesso"):
        controlnet_side_stream(without, ExecutionPolicy(hot_loop=("unet",)))
    assert not isinstance(without.unet.forward, ControlNetAlongside) and "no ControlNet" in caplog.text


def test_fast_takes_it_on_cuda_and_a_cpu_run_refuses_it_by_name(files):
    assert "controlnet_side_stream" in presets(get_host().registry)["fast"]
    with pytest.raises(ConfigError, match="controlnet_side_stream"):
        pipeline(files, "controlnet_side_stream")
    assert not isinstance(pipeline(files, "fast").unet.forward, ControlNetAlongside)  # fast on the CPU skips it
