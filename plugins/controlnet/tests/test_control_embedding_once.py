"""``control_embedding_once``: each ControlNet embeds its control image once per image.

The risk of such a cache is a stale embedding: of another image, or of weights since changed. Each
test changes one thing the embedding depends on and compares with nets that embed at every call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from controlnet_cases import control_image, write_base_and_nets
from gesso import AutoPipelineForText2Image, ControlNetModel
from gesso.runner import optimize
from gesso_controlnet.optimize import ControlEmbeddingOnce


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_base_and_nets(tmp_path_factory.mktemp("control-embedding-once"))


def pipeline(files, *optimizations, nets=1):
    loaded = [ControlNetModel.from_pretrained(path) for path in files["nets"][:nets]]
    built = AutoPipelineForText2Image.from_pretrained(files["base"], controlnet=loaded if nets > 1 else loaded[0])
    optimize(built, list(optimizations))
    return built


def images(pipeline, seeds, steps=3):
    image = [control_image(s) for s in seeds] if len(seeds) > 1 else control_image(seeds[0])
    call = dict(prompt="a dancer", num_inference_steps=steps, output_type="np", height=40, width=48)
    return pipeline(**call, image=image, generator=torch.Generator().manual_seed(1)).images


def net_call(net, control, seed=0):
    generator = torch.Generator().manual_seed(seed)
    side = control.shape[-1] // 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    sample = torch.randn(control.shape[0], 4, side, side, generator=generator)
    hidden = torch.randn(control.shape[0], 77, net.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return net(sample, 10, hidden, controlnet_cond=control, return_dict=False)


def assert_same_residuals(got, expected):
    for a, b in zip([*got[0], got[1]], [*expected[0], expected[1]], strict=True):
        torch.testing.assert_close(a, b)


def test_images_match_and_each_image_embeds_its_control_image_once(files):
    plain, once = pipeline(files), pipeline(files, "control_embedding_once")
    wrapper = once.controlnet.forward
    assert isinstance(wrapper, ControlEmbeddingOnce)
    runs = []
    once.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: runs.append(1))
    for count, seed in enumerate([0, 1, 0], start=1):
        np.testing.assert_allclose(images(once, [seed], steps=4), images(plain, [seed], steps=4), atol=1e-6, rtol=0)
        assert wrapper.embeddings == len(runs) == count  # once per image, not at each of the 4 steps
    assert set(once.controlnet.state_dict()) == set(plain.controlnet.state_dict())  # the buffer is not a weight


def test_each_net_of_a_multi_controlnet_gets_the_embedding_of_its_own_image(files):
    plain, once = pipeline(files, nets=2), pipeline(files, "control_embedding_once", nets=2)
    np.testing.assert_allclose(images(once, [0, 1]), images(plain, [0, 1]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(images(once, [1, 0]), images(plain, [1, 0]), atol=1e-6, rtol=0)  # the images swapped
    assert once.controlnet.forward.embeddings == 2
    first, second = once.controlnet.nets
    assert first.control_embedding is not None and not torch.equal(first.control_embedding, second.control_embedding)


def test_an_image_or_weights_changed_in_place_are_embedded_again(files):
    plain = ControlNetModel.from_pretrained(files["nets"][0])
    net = ControlNetModel.from_pretrained(files["nets"][0])
    net.forward = ControlEmbeddingOnce(net)
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_same_residuals(net_call(net, control), net_call(plain, control))
    net_call(net, control, seed=1)
    assert net.forward.embeddings == 1  # another latent, the same image

    control.mul_(0.5)  # the caller edits the image it passed
    assert_same_residuals(net_call(net, control), net_call(plain, control))
    assert net.forward.embeddings == 2

    with torch.no_grad():
        for model in (net, plain):
            model.controlnet_cond_embedding.conv_in.weight.mul_(1.5)
    assert_same_residuals(net_call(net, control), net_call(plain, control))
    assert net.forward.embeddings == 3

    other = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # a new image of the same shape
    assert_same_residuals(net_call(net, other), net_call(plain, other))
    assert net.forward.embeddings == 4


def test_a_bgr_net_embeds_its_image_with_the_channels_reversed(files, tmp_path):
    net = ControlNetModel.from_pretrained(files["nets"][0])
    net.register_to_config(controlnet_conditioning_channel_order="bgr")
    net.save_pretrained(tmp_path / "bgr")
    plain, once = ControlNetModel.from_pretrained(tmp_path / "bgr"), ControlNetModel.from_pretrained(tmp_path / "bgr")
    once.forward = ControlEmbeddingOnce(once)
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_same_residuals(net_call(once, control), net_call(plain, control))
    rgb = ControlNetModel.from_pretrained(files["nets"][0])
    assert not torch.equal(net_call(rgb, control)[1], net_call(plain, control)[1])  # the flip matters for this image


def test_with_gradients_the_image_is_embedded_at_each_call(files):
    net = ControlNetModel.from_pretrained(files["nets"][0])
    net.forward = ControlEmbeddingOnce(net)
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    net_call(net, control)
    assert net.control_embedding is not None
    side = 32 // 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    sample = torch.randn(2, 4, side, side)
    hidden = torch.randn(2, 77, net.config.cross_attention_dim)
    down, mid = net(sample, 10, hidden, controlnet_cond=control, return_dict=False)
    assert net.control_embedding is None  # dropped: the embedding is part of the autograd graph
    mid.sum().backward()
    assert net.controlnet_cond_embedding.conv_in.weight.grad is not None


def test_fast_takes_it_where_the_plugin_is_installed_and_it_applies_once(files):
    from gesso.config import presets
    from gesso.plugins import get_host

    assert "control_embedding_once" in presets(get_host().registry)["fast"]
    once = pipeline(files, "control_embedding_once", "control_embedding_once")
    assert not isinstance(once.controlnet.forward.forward, ControlEmbeddingOnce)  # not wrapped twice
