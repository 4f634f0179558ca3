"""The example optimization plugin, tested as its author would: through gesso.testing."""

from __future__ import annotations

from types import SimpleNamespace

import gesso
import pytest
import torch
from gesso.testing import assert_pipelines_agree, assert_plugin_loads
from gesso_example_vae_slicing.slicing import vae_slicing


@pytest.fixture
def host(plugin_host):
    """Only this plugin and the family it is tested on: other installed plugins cannot interfere."""
    return plugin_host(entry_points=["sd15", "example_vae_slicing"])


def test_entry_point_loads_and_registers_the_optimization():
    info = assert_plugin_loads("example_vae_slicing")
    assert info.registers == {"optimizations": ["vae_slicing"]}


def decoder_batch_sizes(pipeline) -> list[int]:
    sizes: list[int] = []
    pipeline.vae.decoder.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def test_decodes_one_image_at_a_time_with_the_same_pixels(host, tiny_checkpoint):
    checkpoint = tiny_checkpoint("sd15")
    plain = gesso.AutoPipelineForText2Image.from_pretrained(checkpoint)
    sliced = gesso.AutoPipelineForText2Image.from_pretrained(checkpoint)
    spec = host.registry.optimizations["vae_slicing"]
    assert spec.supports("sd15", "cpu") is None
    for _ in range(2):  # applying it twice changes nothing more
        spec.load_apply()(sliced, host.registry.families["sd15"].execution_policy)
    plain_sizes, sliced_sizes = decoder_batch_sizes(plain), decoder_batch_sizes(sliced)
    assert_pipelines_agree(plain, sliced, seed=2, num_images_per_prompt=3, atol=1e-5)
    assert plain_sizes == [3] and sliced_sizes == [1, 1, 1]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    output = sliced.vae.decode(latents)  # the return_dict=True form keeps its output type
    assert type(output) is type(plain.vae.decode(latents))
    torch.testing.assert_close(output.sample, plain.vae.decode(latents).sample, rtol=0, atol=1e-5)


def test_usable_from_a_run_config(host, tiny_checkpoint):
    config = {"model": str(tiny_checkpoint("sd15")), "prompt": "a lighthouse", "num_images_per_prompt": 2, "num_inference_steps": 2}
    sliced = {**config, "optimizations": ["vae_slicing"]}
    assert list(gesso.run(sliced, write=False).config.optimizations) == ["vae_slicing"]
    assert_pipelines_agree(config, sliced, seed=4, atol=1 / 255)  # 8-bit images: a value may round the other way


def test_a_pipeline_without_a_vae_is_refused():
    with pytest.raises(ValueError, match="needs a pipeline with a VAE"):
        vae_slicing(SimpleNamespace(vae=None), None)
