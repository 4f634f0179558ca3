"""MoVQ: Kandinsky 2.2's vector-quantised autoencoder (``VQModel`` in the reference layout).

The encoder is the core KL autoencoder's (without the doubled moments) and the decoder the core
decoder with every norm made spatially conditional on the quantised latent ("modulated" VQ:
``GroupNorm(f) * conv_y(z_q) + conv_b(z_q)``). The published model also has single-head
self-attention in its lowest-resolution stages (``AttnDownEncoderBlock2D`` /
``AttnUpDecoderBlock2D``), provided here on top of the core encoder/decoder blocks. Generation
only decodes (``force_not_quantize=True``: the UNet's latents are used as they are); the encoder
and the codebook are built so the published weights load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gesso.configuration import register_to_config
from gesso.modeling import ModelMixin
from gesso.nn import Attention, Decoder, DownEncoderBlock2D, Encoder, GroupNorm, NormFactory, UpDecoderBlock2D
from gesso.nn.embeddings import embedding
from torch import nn


class SpatialNorm(nn.Module):
    """GroupNorm of the features, scaled and shifted per pixel by 1x1 convs of the (resized) latent."""

    def __init__(self, channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm_layer = GroupNorm(32, channels, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    def forward(self, features: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=features.shape[-2:], mode="nearest")
        return self.norm_layer(features) * self.conv_y(zq) + self.conv_b(zq)


def _single_head_attention(channels: int, groups: int, norm_factory: NormFactory | None = None) -> Attention:
    return Attention(
        channels,
        heads=1,
        dim_head=channels,
        bias=True,
        eps=1e-6,
        norm_num_groups=None if norm_factory is not None else groups,
        residual_connection=True,
        spatial_norm=norm_factory(channels) if norm_factory is not None else None,
    )


class AttnDownEncoderBlock2D(DownEncoderBlock2D):
    """An encoder stage with a single-head self-attention after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        resnet_act_fn: str,
        resnet_groups: int,
        add_downsample: bool,
        downsample_padding: int = 0,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            num_layers=num_layers,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            add_downsample=add_downsample,
            downsample_padding=downsample_padding,
        )
        self.attentions = nn.ModuleList(_single_head_attention(out_channels, resnet_groups) for _ in range(num_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = attention(resnet(hidden_states))
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class AttnUpDecoderBlock2D(UpDecoderBlock2D):
    """A decoder stage with a single-head self-attention (spatially normed when conditional) after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        resnet_act_fn: str,
        resnet_groups: int,
        add_upsample: bool,
        temb_channels: int | None,
        norm_factory: NormFactory | None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            num_layers=num_layers,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            add_upsample=add_upsample,
            temb_channels=temb_channels,
            norm_factory=norm_factory,
        )
        self.attentions = nn.ModuleList(_single_head_attention(out_channels, resnet_groups, norm_factory) for _ in range(num_layers))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = attention(resnet(hidden_states, temb), temb=temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class MoVQEncoder(Encoder):
    """The core encoder, with attention stages where the config asks for ``AttnDownEncoderBlock2D``."""

    down_block_classes = {**Encoder.down_block_classes, "AttnDownEncoderBlock2D": AttnDownEncoderBlock2D}


class MoVQDecoder(Decoder):
    """The core decoder, with attention stages where the config asks for ``AttnUpDecoderBlock2D``."""

    up_block_classes = {**Decoder.up_block_classes, "AttnUpDecoderBlock2D": AttnUpDecoderBlock2D}


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation (straight-through gradient), as VQGAN trains it."""

    def __init__(self, num_embeddings: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embed_dim = embed_dim
        self.beta = beta
        self.embedding = embedding(num_embeddings, embed_dim)  # no random init on the meta device

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """``(B, C, H, W)`` -> (quantised, commitment loss, (None, None, codebook indices))."""
        channels_last = z.permute(0, 2, 3, 1).contiguous()
        flat = channels_last.view(-1, self.embed_dim)
        indices = torch.argmin(torch.cdist(flat, self.embedding.weight), dim=1)
        quantised = self.embedding(indices).view(channels_last.shape)
        loss = torch.mean((quantised.detach() - channels_last) ** 2) + self.beta * torch.mean((quantised - channels_last.detach()) ** 2)
        quantised = channels_last + (quantised - channels_last).detach()
        return quantised.permute(0, 3, 1, 2).contiguous(), loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Codebook vectors for ``indices``; with ``shape`` (B, H, W, C) they come back as ``(B, C, H, W)``."""
        vectors = self.embedding(indices)
        if shape is not None:
            vectors = vectors.view(*shape).permute(0, 3, 1, 2).contiguous()
        return vectors


@dataclass
class VQEncoderOutput:
    latents: torch.Tensor


@dataclass
class VQDecoderOutput:
    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)


class VQModel(ModelMixin):
    """Images <-> latents through a codebook; ``norm_type="spatial"`` conditions the decoder on the latent."""

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
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        if norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type: unknown {norm_type!r}; known: 'group', 'spatial'")
        common = dict(
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, act_fn=act_fn
        )
        self.encoder = MoVQEncoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
            **common,
        )
        embed_dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        spatial = norm_type == "spatial"
        self.decoder = MoVQDecoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            mid_block_add_attention=mid_block_add_attention,
            norm_factory=(lambda channels: SpatialNorm(channels, latent_channels)) if spatial else None,
            temb_channels=latent_channels if spatial else None,
            **common,
        )

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        latents = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=latents) if return_dict else (latents,)

    def decode(
        self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape: Sequence[int] | None = None
    ) -> VQDecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Latents -> image. Without ``force_not_quantize`` the latents snap to the codebook first;
        with ``lookup_from_codebook`` ``h`` holds codebook indices (``shape`` gives their layout)."""
        zeros = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        elif self.config.lookup_from_codebook:
            quant, commit_loss = self.quantize.get_codebook_entry(h, shape), zeros
        else:
            quant, commit_loss = h, zeros
        condition = quant if self.config.norm_type == "spatial" else None
        image = self.decoder(self.post_quant_conv(quant), condition)
        return VQDecoderOutput(sample=image, commit_loss=commit_loss) if return_dict else (image, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> VQDecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct: encode, quantise, decode."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)  # type: ignore[union-attr]
