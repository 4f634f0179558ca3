"""AutoencoderKL: parity with the reference on tiny configs (encode, posterior, decode)."""

from __future__ import annotations

import pytest
import torch
from gesso.nn import AutoencoderKL
from nn_parity import assert_close, perturb_vectors
from torch import nn

diffusers = pytest.importorskip("diffusers")

VAE_TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)


def build_pair(config: dict, seed: int = 0) -> tuple[nn.Module, AutoencoderKL]:
    torch.manual_seed(seed)
    reference = diffusers.AutoencoderKL(**config).eval()
    perturb_vectors(reference, seed)
    ours = AutoencoderKL.from_config(dict(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}],
    ids=["default", "no-attention-no-quant-conv"],
)
@torch.no_grad()
def test_tiny_vae_encode_decode_parity(overrides):
    reference, ours = build_pair(dict(VAE_TINY, **overrides))
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1

    expected = reference.encode(image).latent_dist
    posterior = ours.encode(image).latent_dist
    assert_close(posterior.mean, expected.mean)
    assert_close(posterior.std, expected.std)
    assert_close(posterior.mode(), expected.mode())
    sample = posterior.sample(torch.Generator().manual_seed(7))
    assert_close(sample, expected.sample(torch.Generator().manual_seed(7)))
    assert_close(posterior.kl(), expected.kl())

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    decoded = ours.decode(latents).sample
    assert decoded.shape == (2, 3, 32, 32)
    assert_close(decoded, reference.decode(latents).sample)
    assert_close(ours.decode(latents, return_dict=False)[0], decoded)
    assert_close(ours(image).sample, reference(image).sample)


def test_config_and_unknown_block_type():
    vae = AutoencoderKL(**VAE_TINY, scaling_factor=0.13025, force_upcast=True)
    assert vae.config.scaling_factor == 0.13025 and vae.config.shift_factor is None
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL(**dict(VAE_TINY, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")))


@torch.no_grad()
def test_loads_a_folder_saved_by_the_reference(tmp_path):
    reference, _ = build_pair(VAE_TINY)
    reference.save_pretrained(tmp_path / "vae")
    ours = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", torch_dtype=torch.float32)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    assert_close(ours.decode(latents).sample, reference.decode(latents).sample)


class _SpatialNorm(nn.Module):
    """What the MoVQ plugin will provide: a GroupNorm modulated by the (resized) quantized latent."""

    def __init__(self, channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = torch.nn.functional.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


@torch.no_grad()
def test_decoder_with_conditional_norm_matches_spatial_decoder():
    """The hook MoVQ's decoder needs: a norm factory makes every norm conditional on the latent."""
    from diffusers.models.autoencoders.vae import Decoder as ReferenceDecoder
    from gesso.nn import Decoder

    kwargs = dict(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1)
    torch.manual_seed(0)
    reference = ReferenceDecoder(**kwargs, norm_num_groups=32, norm_type="spatial").eval()
    perturb_vectors(reference)
    ours = Decoder(**kwargs, norm_num_groups=32, norm_factory=lambda channels: _SpatialNorm(channels, 4), temb_channels=4).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert_close(ours(z, latent_embeds=z), reference(z, latent_embeds=z))
