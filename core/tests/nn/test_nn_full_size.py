"""Parity at the published SD1.5 / SDXL sizes, with random weights shared between the two models.

The reference is built on the meta device and filled cheaply; gesso's model is built on meta too
and given the reference's tensors with ``assign=True``, so only one copy of the weights exists
(SDXL's UNet is 10 GB in float32).
"""

from __future__ import annotations

import gc

import pytest
import torch
from gesso.nn import AutoencoderKL, UNet2DConditionModel
from nn_parity import assert_close, cheap_random_init, full_config

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow


def shared_pair(reference_cls, ours_cls, config: dict):
    with torch.device("meta"):
        reference = reference_cls(**config)
    reference = reference.to_empty(device="cpu").eval()
    cheap_random_init(reference)
    with torch.device("meta"):
        ours = ours_cls.from_config(config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, ours.eval()


def unet_inputs(cross_dim: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        sample=torch.randn(1, 4, 8, 8, generator=g),
        timestep=torch.tensor([981]),
        encoder_hidden_states=torch.randn(1, 4, cross_dim, generator=g),
    )


@torch.no_grad()
def test_sd15_unet_full_size():
    config = full_config("sd15", "unet")
    reference, ours = shared_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, config)
    assert sum(p.numel() for p in ours.parameters()) == 859520964
    x = unet_inputs(768)
    assert_close(ours(**x).sample, reference(**x).sample)
    del reference, ours
    gc.collect()


@torch.no_grad()
def test_sdxl_unet_full_size():
    config = full_config("sdxl", "unet")
    reference, ours = shared_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, config)
    assert sum(p.numel() for p in ours.parameters()) == 2567463684
    x = unet_inputs(2048)
    g = torch.Generator().manual_seed(2)
    added = dict(text_embeds=torch.randn(1, 1280, generator=g), time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]))
    assert_close(ours(**x, added_cond_kwargs=added).sample, reference(**x, added_cond_kwargs=added).sample)
    del reference, ours
    gc.collect()


@torch.no_grad()
def test_sd15_vae_full_size():
    config = full_config("sd15", "vae")
    reference, ours = shared_pair(diffusers.AutoencoderKL, AutoencoderKL, config)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    assert_close(ours.encode(image).latent_dist.mean, reference.encode(image).latent_dist.mean)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    assert_close(ours.decode(latents).sample, reference.decode(latents).sample)
    del reference, ours
    gc.collect()
