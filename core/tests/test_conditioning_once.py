"""``conditioning_once``: a model's per-image conditioning computed once an image.

Here SDXL's addition embedding (pooled prompt and size ids), in the UNet and in an SDXL
ControlNet; Kandinsky's projected image context is tested in its plugin. The risk of such a cache
is a stale result: of another image's inputs, or of weights since changed. Each test changes one
thing the conditioning depends on and compares with a model that computes it at every call.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from gesso import AutoPipelineForText2Image, ControlNetModel
from gesso.nn import TextTimeEmbedding
from gesso.optimize.conditioning_once import ConditioningOnce
from gesso.runner import optimize


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gesso_controlnet.tiny import SDXL_CONFIG, write_tiny_controlnet
    from gesso_sdxl.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("conditioning-once")
    nets = [write_tiny_controlnet(root / f"net{seed}", config=SDXL_CONFIG, seed=seed) for seed in (3, 4)]
    return {"sdxl": write_tiny_checkpoint(root / "sdxl"), "nets": nets}


def loaded(files, *optimizations, nets=0):
    loaded_nets = [ControlNetModel.from_pretrained(path) for path in files["nets"][:nets]]
    extra = {"controlnet": loaded_nets if nets > 1 else loaded_nets[0]} if nets else {}
    pipeline = AutoPipelineForText2Image.from_pretrained(files["sdxl"], **extra)
    optimize(pipeline, list(optimizations))
    return pipeline


def control_image(seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def images(pipeline, steps=3, **call):
    return pipeline("a lighthouse", num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0), **call).images


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def unet_call(unet, added, seed=0):
    """One step with the text states kept in ``added`` (as a pipeline keeps them for a whole image)."""
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    added = dict(added)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=added.pop("states"), added_cond_kwargs=added, return_dict=False)[0]


def added_conditioning(unet, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {
        "states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator),
        "text_embeds": torch.randn(2, pooled, generator=generator),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }


def test_sdxl_images_match_and_the_addition_embedding_runs_once_an_image(files):
    plain = loaded(files)
    pipeline = loaded(files, "conditioning_once")
    wrapper = pipeline.unet.forward
    assert isinstance(wrapper, ConditioningOnce) and [(m.model, m.addition, m.context) for m in wrapper.models] == [
        (pipeline.unet, True, False)
    ]
    calls = count_calls(pipeline.unet.add_embedding)
    sizes = [(64, 64), (32, 48), (64, 64)]  # the size ids are part of the conditioning
    for count, size in enumerate(sizes, start=1):
        np.testing.assert_allclose(images(pipeline, original_size=size), images(plain, original_size=size), atol=1e-6, rtol=0)
        assert wrapper.computations == calls[0] == count  # not at each of the 3 steps
    assert set(pipeline.unet.state_dict()) == set(plain.unet.state_dict())  # the buffers are not weights


def test_ids_or_weights_changed_in_place_are_computed_again(files):
    plain, unet = loaded(files).unet, loaded(files, "conditioning_once").unet
    added = added_conditioning(unet)
    torch.testing.assert_close(unet_call(unet, added), unet_call(plain, added))
    unet_call(unet, added)
    assert unet.forward.computations == 1

    added["time_ids"][1, 0] = 32.0  # the conditional half's original size
    torch.testing.assert_close(unet_call(unet, added), unet_call(plain, added))
    assert unet.forward.computations == 2

    with torch.no_grad():
        for model in (unet, plain):
            model.add_embedding.linear_2.weight.mul_(1.5)
    torch.testing.assert_close(unet_call(unet, added), unet_call(plain, added))
    assert unet.forward.computations == 3


def test_the_same_tensors_under_other_keys_are_another_input(files):
    unet = loaded(files, "conditioning_once").unet
    added = added_conditioning(unet)
    unet_call(unet, added)
    unet_call(unet, {**added, "unused": added["time_ids"]})
    assert unet.forward.computations == 2


def test_with_gradients_the_embedding_runs_in_the_call(files):
    unet = loaded(files, "conditioning_once").unet
    added = added_conditioning(unet)
    unet_call(unet, added)
    assert unet.precomputed_addition is not None
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size)
    states = added.pop("states")
    unet(sample, 10, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[0].square().mean().backward()
    assert unet.precomputed_addition is None
    assert unet.add_embedding.linear_1.weight.grad is not None and unet.add_embedding.linear_1.weight.grad.abs().sum() > 0


def test_an_sdxl_controlnet_computes_its_addition_embedding_once_an_image_too(files):
    plain, pipeline = loaded(files, nets=1), loaded(files, "conditioning_once", nets=1)
    assert isinstance(pipeline.controlnet.forward, ConditioningOnce)
    calls = count_calls(pipeline.controlnet.add_embedding)
    np.testing.assert_allclose(images(pipeline, image=control_image(0)), images(plain, image=control_image(0)), atol=1e-6, rtol=0)
    assert calls[0] == pipeline.controlnet.forward.computations == 1


def test_each_net_of_a_multi_controlnet_computes_its_addition_embedding_once_an_image(files):
    plain, pipeline = loaded(files, nets=2), loaded(files, "conditioning_once", nets=2)
    wrapper = pipeline.controlnet.forward
    assert isinstance(wrapper, ConditioningOnce) and [part.model for part in wrapper.models] == list(pipeline.controlnet.nets)
    calls = [count_calls(net.add_embedding) for net in pipeline.controlnet.nets]
    for count, size in enumerate([(64, 64), (32, 48)], start=1):
        call = dict(image=[control_image(0), control_image(1)], original_size=size)
        np.testing.assert_allclose(images(pipeline, **call), images(plain, **call), atol=1e-6, rtol=0)
        assert [c[0] for c in calls] == [count, count] and wrapper.computations == count  # each net, once an image


def test_models_without_per_image_conditioning_are_left_alone(files, monkeypatch):
    from gesso_sd15.tiny import write_tiny_checkpoint

    sd15 = AutoPipelineForText2Image.from_pretrained(write_tiny_checkpoint(files["sdxl"].parent / "sd15"))
    optimize(sd15, ["conditioning_once"])
    assert not isinstance(sd15.unet.forward, ConditioningOnce)
    monkeypatch.setattr(TextTimeEmbedding, "per_image", False)  # an embedding that may read the timestep embedding
    assert not isinstance(loaded(files, "conditioning_once").unet.forward, ConditioningOnce)
