"""The KL autoencoder of Stable Diffusion 1.x / 2.x / XL (the "VAE")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gesso.configuration import register_to_config
from gesso.modeling import ModelMixin
from gesso.nn.tiling import tiled_decode
from gesso.nn.vae import Decoder, DiagonalGaussianDistribution, Encoder


@dataclass
class AutoencoderKLOutput:
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class AutoencoderKL(ModelMixin):
    """Images <-> latents: ``encode(x).latent_dist`` is a Gaussian posterior, ``decode(z).sample`` an image.

    The pipeline, not this model, applies ``scaling_factor`` / ``shift_factor`` (they are config
    values for it to read). ``force_upcast`` tells the pipeline to decode in float32, as the SDXL
    VAE overflows in float16.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            down_block_types,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            up_block_types,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    use_tiling = False

    def enable_tiling(self, enabled: bool = True) -> None:
        """Decode latents larger than the training size in overlapping tiles (see :mod:`gesso.nn.tiling`)."""
        self.use_tiling = enabled

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        sample_size = self.config.sample_size if isinstance(self.config.sample_size, int) else self.config.sample_size[0]
        latent_tile = sample_size // 2 ** (len(self.config.block_out_channels) - 1)
        if self.use_tiling and (z.shape[-1] > latent_tile or z.shape[-2] > latent_tile):
            image = tiled_decode(self._decode_tile, z, latent_tile, sample_size)
        else:
            image = self._decode_tile(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(
        self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist  # type: ignore[union-attr]
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
