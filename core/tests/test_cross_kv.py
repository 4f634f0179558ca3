"""``cross_kv_once``: the prompt's cross-attention keys and values projected once per image.

The risk of such a cache is a stale entry: keys and values of another prompt, or of weights since
changed. Each test below changes one thing the projections depend on and compares with the UNet
that projects at every call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.optimize.cross_kv import CrossKVOnce, cross_attentions
from gesso.runner import optimize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from gesso_sd15.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd15"))


def images(pipeline, prompt="a cat", steps=3):
    return pipeline(prompt, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)).images


def optimized(folder, *names):
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, names)
    return pipeline


def unet_call(unet, context, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context, return_dict=False)[0]


def test_images_match_and_each_image_projects_the_prompt_once(folder):
    plain = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline = optimized(folder, "fuse_qkv", "cross_kv_once")
    wrapper = pipeline.unet.forward
    assert isinstance(wrapper, CrossKVOnce) and len(wrapper.attentions) == len(cross_attentions(plain.unet)) > 0
    for count, prompt in enumerate(["a cat", "a dog", "a cat"], start=1):
        np.testing.assert_allclose(images(pipeline, prompt, steps=4), images(plain, prompt, steps=4), atol=1e-6, rtol=0)
        assert wrapper.projections == count  # once per image, not at each of the 4 steps
    assert set(pipeline.unet.state_dict()) == set(plain.unet.state_dict())  # the buffers are not weights


def test_a_context_or_weights_changed_in_place_are_projected_again(folder):
    plain = AutoPipelineForText2Image.from_pretrained(folder).unet
    unet = optimized(folder, "fuse_qkv", "cross_kv_once").unet
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(unet_call(unet, context), unet_call(plain, context))
    unet_call(unet, context)
    assert unet.forward.projections == 1

    context[1].mul_(2.0)  # through a view: the version counter is shared
    torch.testing.assert_close(unet_call(unet, context), unet_call(plain, context))
    assert unet.forward.projections == 2

    attention = cross_attentions(unet)[0]
    with torch.no_grad():
        attention.to_k.weight.mul_(1.5)  # a view into the fused k/v weight
        cross_attentions(plain)[0].to_k.weight.mul_(1.5)
    torch.testing.assert_close(unet_call(unet, context), unet_call(plain, context))
    assert unet.forward.projections == 3


def test_a_new_context_of_the_same_shape_and_a_view_of_the_last_one(folder):
    plain = AutoPipelineForText2Image.from_pretrained(folder).unet
    unet = optimized(folder, "cross_kv_once").unet
    dim = unet.config.cross_attention_dim
    first = torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(1))
    unet_call(unet, first)
    del first  # (a new tensor at a freed context's address: tests/gpu, where CUDA's allocator reuses it at once)
    second = torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(unet_call(unet, second), unet_call(plain, second))
    assert unet.forward.projections == 2
    # The same memory seen through a new tensor object (as ``chunk`` gives at every step): no projection.
    unet_call(unet, second.view(2, 77, dim))
    assert unet.forward.projections == 2
    # The same shape at other offsets of the same storage is another context.
    both = torch.randn(4, 77, dim, generator=torch.Generator().manual_seed(3))
    for half in both.chunk(2):
        torch.testing.assert_close(unet_call(unet, half), unet_call(plain, half))
    assert unet.forward.projections == 4


def test_under_inference_mode_a_context_written_in_place_is_still_seen(folder):
    """Inference tensors keep no version counter: the projections then run at every call."""
    plain = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline = optimized(folder, "fuse_qkv", "cross_kv_once")
    with torch.inference_mode():
        np.testing.assert_allclose(images(pipeline, steps=3), images(plain, steps=3), atol=1e-6, rtol=0)
        context = torch.randn(2, 77, pipeline.unet.config.cross_attention_dim)
        unet_call(pipeline.unet, context)
        context.mul_(2.0)
        torch.testing.assert_close(unet_call(pipeline.unet, context), unet_call(plain.unet, context))
    # buffers made under inference mode are written again outside it
    np.testing.assert_allclose(images(pipeline, "a dog"), images(plain, "a dog"), atol=1e-6, rtol=0)


def test_with_gradients_the_projections_run_at_each_call(folder):
    unet = optimized(folder, "cross_kv_once").unet
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    unet_call(unet, context)
    attention = cross_attentions(unet)[0]
    assert attention.text_key is not None
    sample = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    unet(sample, 10, encoder_hidden_states=context, return_dict=False)[0].square().mean().backward()
    assert attention.text_key is None
    assert attention.to_k.weight.grad is not None and attention.to_k.weight.grad.abs().sum() > 0


def test_compiled_blocks_read_each_prompts_keys_and_values(folder, monkeypatch):
    """The buffers are inputs of the compiled blocks, not constants folded in at the first compile."""
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # graph capture without code generation (CI time)
    plain = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline = optimized(folder, "fuse_qkv", "compile", "cross_kv_once")
    for prompt in ("a cat", "a dog"):
        np.testing.assert_allclose(images(pipeline, prompt), images(plain, prompt), atol=1e-4)
    assert pipeline.unet.forward.projections == 2


def test_a_unet_that_transforms_its_context_first_is_left_alone(folder):
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline.unet.encoder_hid_proj = torch.nn.Identity()  # its attentions would see this module's output
    optimize(pipeline, ["cross_kv_once"])
    assert not isinstance(pipeline.unet.forward, CrossKVOnce)
