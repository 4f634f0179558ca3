"""The optimizations reach Kandinsky's own components: the prior and its encoders, and the MoVQ decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.plugins import get_host
from gesso.runner import optimize
from gesso_kandinsky.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-kandinsky-optimize") / "combined")


def image(pipeline, prompt="a cat"):
    return pipeline(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        prior_num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_cuda_graph_replays_the_prior_its_encoders_and_the_movq_decoder(folder):
    """The prior's steps run outside the decoder's loop, eager and launch-bound, unless the policy names them."""
    from gesso.optimize.cuda_graph import GraphedForward, cuda_graph

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    cuda_graph(pipeline, get_host().registry.families["kandinsky"].execution_policy)
    graphed = {
        "unet": pipeline.unet,
        "prior_prior": pipeline.prior_prior,
        "prior_text_encoder": pipeline.prior_text_encoder,
        "prior_image_encoder": pipeline.prior_image_encoder,
        "movq.decoder": pipeline.movq.decoder,
    }
    assert all(isinstance(module.forward, GraphedForward) for module in graphed.values())
    assert len({id(module.forward.pool) for module in graphed.values()}) == 1
    assert not isinstance(pipeline.movq.encoder.forward, GraphedForward)  # not run for text to image


def test_the_prior_is_fused_and_compiled_as_a_hot_loop_and_gives_the_same_image(folder, monkeypatch):
    """The prior runs 25 steps of its own; its blocks are compiled regions and its attention fuses q/k/v."""
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # full graph capture, no code generation (CI time)
    monkeypatch.setenv("GESSO_COMPILE_CACHE", "off")
    plain = image(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["fuse_qkv", "compile"])
    blocks = pipeline.prior_prior.transformer_blocks
    assert all(block.attn1.fused == "qkv" for block in blocks)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
    difference = np.abs(image(pipeline) - plain)
    assert difference.max() < 1e-2 and difference.mean() < 1e-4


def test_movq_is_the_image_decoder_that_layout_and_compilation_reach(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # full graph capture, no code generation (CI time)
    monkeypatch.setenv("GESSO_COMPILE_CACHE", "off")
    plain = image(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["channels_last", "compile_vae"])
    convolutions = [m for m in pipeline.movq.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    compiled = [m for m in pipeline.movq.decoder.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert {type(m).__name__ for m in compiled} >= {"ResnetBlock2D"}
    # float32 rounding of NHWC convolutions and traced blocks, which this random model's steps amplify
    # (1.4e-3 at most, 7e-6 on average, measured); a wrong layout or block would differ everywhere
    difference = np.abs(image(pipeline) - plain)
    assert difference.max() < 1e-2 and difference.mean() < 1e-4


def test_vae_tiling_names_the_decoder_that_cannot_tile(folder):
    from gesso.config import ConfigError

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    with pytest.raises((ValueError, ConfigError), match="vae_tiling.*'movq' has none"):
        optimize(pipeline, ["vae_tiling"])


def test_fused_time_projections_cover_the_resampling_resnets_and_give_the_same_image(folder):
    """Kandinsky's blocks resample with resnets that also take the time embedding (scale-shift)."""
    from gesso.nn.resnet import ResnetBlock2D

    plain = image(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["fuse_time_projections"])
    resnets = [m for m in pipeline.unet.modules() if isinstance(m, ResnetBlock2D)]
    assert pipeline.unet.time_projections is not None and all(r.time_projected for r in resnets)
    assert any(r.resample is not None for r in resnets) and {r.time_embedding_norm for r in resnets} == {"scale_shift"}
    np.testing.assert_allclose(image(pipeline), plain, atol=1e-5, rtol=0)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_conditioning_once_projects_the_image_context_once_an_image(folder):
    """The image embedding's 32 tokens, their keys and values in every attention, and the embedding
    added to the timestep's: computed before the first step of each image, read by all its steps."""
    from gesso.optimize.conditioning_once import ConditioningOnce
    from gesso_kandinsky.unet import AddedKVAttention

    plain = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["fuse_qkv", "conditioning_once"])
    unet, wrapper = pipeline.unet, pipeline.unet.forward
    attentions = [m for m in unet.modules() if isinstance(m, AddedKVAttention)]
    assert isinstance(wrapper, ConditioningOnce) and len(wrapper.models) == 1
    assert wrapper.models[0].addition and wrapper.models[0].context and wrapper.models[0].attentions == attentions
    calls = [count_calls(module) for module in (unet.encoder_hid_proj, unet.add_embedding, attentions[0].add_k_proj)]
    for count, prompt in enumerate(["a cat", "a dog"], start=1):
        np.testing.assert_allclose(image(pipeline, prompt), image(plain, prompt), atol=1e-6, rtol=0)
        assert [c[0] for c in calls] == [count] * 3 and wrapper.computations == count  # not at each step
    assert all(a.text_key is not None for a in attentions)
    assert set(unet.state_dict()) == set(plain.unet.state_dict())

    embeds = torch.randn(2, unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(1))
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))

    def step(model):
        with torch.no_grad():
            return model(sample, 10, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds}, return_dict=False)[0]

    torch.testing.assert_close(step(unet), step(plain.unet))
    embeds[1].mul_(-1.0)  # in place, through a view
    torch.testing.assert_close(step(unet), step(plain.unet))
    with torch.no_grad():
        for model in (unet, plain.unet):
            next(m for m in model.modules() if isinstance(m, AddedKVAttention)).add_v_proj.weight.mul_(1.5)
    torch.testing.assert_close(step(unet), step(plain.unet))
    assert wrapper.computations == 5


def test_compiled_attentions_read_each_images_keys_and_values(folder, monkeypatch):
    """The buffers are inputs of the compiled attentions, not constants folded in at the first compile."""
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # full graph capture, no code generation (CI time)
    monkeypatch.setenv("GESSO_COMPILE_CACHE", "off")
    compiled, pipeline = (AutoPipelineForText2Image.from_pretrained(folder) for _ in range(2))
    optimize(compiled, ["compile"])  # the prior's compiled steps round differently from eager ones: compare like with like
    optimize(pipeline, ["compile", "conditioning_once"])
    for prompt in ("a cat", "a dog"):
        np.testing.assert_allclose(image(pipeline, prompt), image(compiled, prompt), atol=1e-5, rtol=0)
    assert pipeline.unet.forward.computations == 2


def test_fast_times_the_decoders_convolution_algorithms_for_kandinsky_only():
    """cuDNN's own pick is well off the fastest on the decoder's maps of 384, 1,152 and 1,536
    channels, not on the other families' (measured in benchmarks/NOTES.md)."""
    from gesso.config import presets

    registry = get_host().registry
    assert "cudnn_benchmark" in presets(registry, registry.families["kandinsky"].execution_policy)["fast"]
    assert "cudnn_benchmark" not in presets(registry, registry.families["sd15"].execution_policy)["fast"]
