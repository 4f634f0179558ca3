"""Encoder, decoder and posterior shared by the autoencoders (AutoencoderKL now, MoVQ later)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from gesso.nn.activations import get_activation
from gesso.nn.normalization import GroupNorm, OutputGroupNorm
from gesso.nn.resnet import NormFactory
from gesso.nn.unet_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D


def _check_block_types(key: str, types: Sequence[str], known: Mapping[str, type]) -> None:
    unknown = sorted({t for t in types if t not in known})
    if unknown:
        raise ValueError(f"{key}: unsupported block type(s) {unknown}; this autoencoder builds {sorted(known)}")


class Encoder(nn.Module):
    """Image to latent moments: conv_in, downsampling stages, attention mid-block, norm-act-conv_out.

    With ``double_z`` the output has ``2 * out_channels`` channels: the mean and log-variance.
    """

    #: The stage classes by the name a config gives them; a subclass adds its own (MoVQ's attention stages).
    down_block_classes: ClassVar[dict[str, type[nn.Module]]] = {"DownEncoderBlock2D": DownEncoderBlock2D}

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        _check_block_types("down_block_types", down_block_types, self.down_block_classes)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            self.down_block_classes[kind](
                block_out_channels[max(i - 1, 0)],
                block_out_channels[i],
                num_layers=layers_per_block,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                add_downsample=i < len(block_out_channels) - 1,
                downsample_padding=0,
            )
            for i, kind in enumerate(down_block_types)
        )
        top = block_out_channels[-1]
        self.mid_block = UNetMidBlock2D(
            top, resnet_act_fn=act_fn, resnet_groups=norm_num_groups, attention_head_dim=top, add_attention=mid_block_add_attention
        )
        self.conv_norm_out = GroupNorm(norm_num_groups, top, eps=1e-6)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(top, 2 * out_channels if double_z else out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latent to image: conv_in, attention mid-block, upsampling stages, norm-act-conv_out.

    ``norm_factory`` (with ``temb_channels``) turns every norm into a conditional norm fed with
    ``latent_embeds``, which is how MoVQ's decoder conditions on the quantized latent.
    """

    #: The stage classes by the name a config gives them; a subclass adds its own (MoVQ's attention stages).
    up_block_classes: ClassVar[dict[str, type[nn.Module]]] = {"UpDecoderBlock2D": UpDecoderBlock2D}

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
        norm_factory: NormFactory | None = None,
        temb_channels: int | None = None,
    ) -> None:
        super().__init__()
        _check_block_types("up_block_types", up_block_types, self.up_block_classes)
        top = block_out_channels[-1]
        self.conv_in = nn.Conv2d(in_channels, top, kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(
            top,
            temb_channels,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=top,
            add_attention=mid_block_add_attention,
            norm_factory=norm_factory,
        )
        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList(
            self.up_block_classes[kind](
                reversed_channels[max(i - 1, 0)],
                reversed_channels[i],
                num_layers=layers_per_block + 1,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                add_upsample=i < len(block_out_channels) - 1,
                temb_channels=temb_channels,
                norm_factory=norm_factory,
            )
            for i, kind in enumerate(up_block_types)
        )
        self.conditional_norm = norm_factory is not None
        self.conv_norm_out = (
            norm_factory(block_out_channels[0]) if norm_factory else OutputGroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6)
        )
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        sample = self.conv_in(sample)
        upscale_dtype = next(self.up_blocks.parameters()).dtype
        sample = self.mid_block(sample, latent_embeds).to(upscale_dtype)
        for block in self.up_blocks:
            sample = block(sample, latent_embeds)
        sample = self.conv_norm_out(sample, latent_embeds) if self.conditional_norm else self.conv_norm_out(sample)
        return self.conv_out(self.conv_act(sample))


class DiagonalGaussianDistribution:
    """The encoder's posterior: a Gaussian per latent element, from stacked (mean, log-variance) moments."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Draw ``mean + std * eps``; ``eps`` comes from ``generator`` on its own device (one per sample for a list)."""
        shape, dtype = self.mean.shape, self.mean.dtype
        if isinstance(generator, list):
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator])
        else:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL divergence to ``other`` (a standard normal when None), summed over C, H, W."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=[1, 2, 3])
