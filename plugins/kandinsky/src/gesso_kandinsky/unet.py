"""The parts of Kandinsky 2.2's decoder UNet that the core UNet does not have, registered into it.

The decoder is the core :class:`gesso.nn.UNet2DConditionModel` built from the published config;
what it needs beyond the SD blocks is added through the core registries when this module is
imported (the family's pipeline module imports it, so it happens before any component loads):

* ``encoder_hid_dim_type="image_proj"``: the CLIP image embedding becomes 32 context tokens;
* ``addition_embed_type="image"``: the image embedding is also added to the timestep embedding;
* blocks ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` (resampling done by a resnet
  with ``down``/``up``) and the "simple" cross-attention blocks ``SimpleCrossAttnDownBlock2D``,
  ``UNetMidBlock2DSimpleCrossAttn``, ``SimpleCrossAttnUpBlock2D``, whose attention lets each
  pixel attend to the context tokens (through ``add_k_proj``/``add_v_proj``) and to the feature
  map itself, in one softmax.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from gesso.nn import (
    Attention,
    BlockSpec,
    DownBlock2D,
    ResnetBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    register_addition_embedding,
    register_block,
    register_encoder_hid_projection,
)
from torch import nn


class ImageProjection(nn.Module):
    """``encoder_hid_dim_type="image_proj"``: one image embedding -> ``num_tokens`` context tokens."""

    per_image = True  # reads the image embedding only (conditioning_once may compute it once an image)

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 32) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, encoder_hidden_states: torch.Tensor | None, added_cond_kwargs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        embeds = _image_embeds(added_cond_kwargs, "encoder_hid_dim_type", "image_proj")
        tokens = self.image_embeds(embeds.to(self.image_embeds.weight.dtype))
        return self.norm(tokens.reshape(embeds.shape[0], self.num_tokens, -1))


class ImageTimeEmbedding(nn.Module):
    """``addition_embed_type="image"``: a normalised projection of the image embedding, added to the time embedding."""

    per_image = True  # reads the image embedding only, not ``emb``

    def __init__(self, image_embed_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)
        self.image_norm = nn.LayerNorm(time_embed_dim)

    def forward(
        self, emb: torch.Tensor, encoder_hidden_states: torch.Tensor | None, added_cond_kwargs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.image_norm(self.image_proj(_image_embeds(added_cond_kwargs, "addition_embed_type", "image")))


def _image_embeds(added_cond_kwargs: Mapping[str, torch.Tensor], key: str, value: str) -> torch.Tensor:
    if "image_embeds" not in added_cond_kwargs:
        raise ValueError(f"{key}={value!r} needs added_cond_kwargs['image_embeds'] (the CLIP image embedding)")
    return added_cond_kwargs["image_embeds"]


class AddedKVAttention(Attention):
    """Attention of a feature map over ``[context tokens ; its own pixels]``.

    Queries come from the group-normed pixels; keys and values are the context projected by
    ``add_k_proj``/``add_v_proj`` followed (unless ``only_cross_attention``) by the pixels' own
    ``to_k``/``to_v``. ``norm_cross="group_norm"`` normalises the context over its channels first.
    The output is added back to the input.
    """

    compile_region = True  # compiled on its own by the regional compile (gesso.optimize.compile)
    #: Its keys and values over the context may be computed ahead of the step, into ``text_key`` /
    #: ``text_value`` (``project_context``; gesso.optimize.cross_kv and conditioning_once).
    context_kv_ahead = True

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        groups: int,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        cross_attention_norm_groups: int = 32,
    ) -> None:
        super().__init__(channels, heads=heads, dim_head=dim_head, bias=True, norm_num_groups=groups, eps=1e-5)
        inner_dim = heads * dim_head
        if inner_dim != channels:
            raise ValueError(f"added-KV attention needs heads * head_dim == channels, got {heads} * {dim_head} != {channels}")
        self.only_cross_attention = only_cross_attention
        if only_cross_attention:
            self.to_k = None  # type: ignore[assignment]
            self.to_v = None  # type: ignore[assignment]
        if cross_attention_norm is None:
            self.norm_cross: nn.Module | None = None
        elif cross_attention_norm == "group_norm":
            self.norm_cross = nn.GroupNorm(cross_attention_norm_groups, context_dim, eps=1e-5, affine=True)
        elif cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(context_dim)
        else:
            raise ValueError(f"cross_attention_norm: unknown {cross_attention_norm!r}; known: None, 'group_norm', 'layer_norm'")
        self.add_k_proj = nn.Linear(context_dim, inner_dim)
        self.add_v_proj = nn.Linear(context_dim, inner_dim)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the context tokens, ``(B, N, channels)`` each, normed first if configured."""
        if isinstance(self.norm_cross, nn.GroupNorm):
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        elif self.norm_cross is not None:
            context = self.norm_cross(context)
        return self.add_k_proj(context), self.add_v_proj(context)

    def context_parameters(self) -> list[torch.Tensor]:
        """The weights :meth:`project_context` reads."""
        modules = [self.add_k_proj, self.add_v_proj] + ([self.norm_cross] if self.norm_cross is not None else [])
        return [p for module in modules for p in module.parameters()]

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported by the added-KV attention blocks")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        pixels = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        normed = self.group_norm(pixels.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context_key, context_value = self.add_k_proj(pixels), self.add_v_proj(pixels)
        elif self.text_key is not None:  # computed for this very context before the step
            context_key, context_value = self.text_key, self.text_value
        else:
            context_key, context_value = self.project_context(encoder_hidden_states)

        query = self._split_heads(self.to_q(normed))
        key = self._split_heads(context_key)
        value = self._split_heads(context_value)
        if not self.only_cross_attention:
            key = torch.cat([key, self._split_heads(self.to_k(normed))], dim=2)
            value = torch.cat([value, self._split_heads(self.to_v(normed))], dim=2)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, channels)
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(residual.shape) + residual


# -- blocks --------------------------------------------------------------------------------------
def _resnet(
    spec: BlockSpec, in_channels: int, out_channels: int, *, scale: float | None = None, up: bool = False, down: bool = False
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        spec.temb_channels,
        groups=spec.resnet_groups,
        eps=spec.resnet_eps,
        act_fn=spec.resnet_act_fn,
        time_embedding_norm=spec.resnet_time_scale_shift,
        skip_time_act=spec.resnet_skip_time_act,
        output_scale_factor=spec.resnet_out_scale_factor if scale is None else scale,
        dropout=spec.dropout,
        up=up,
        down=down,
    )


def _attention(spec: BlockSpec, channels: int) -> AddedKVAttention:
    head_dim = spec.attention_head_dim or channels
    return AddedKVAttention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        context_dim=spec.cross_attention_dim,
        groups=spec.resnet_groups,
        only_cross_attention=spec.only_cross_attention,
        cross_attention_norm=spec.cross_attention_norm,
    )


class _ResnetResampling:
    """What Kandinsky's blocks change in the core blocks: resnets with the family's settings,
    resampling by a resnet that also sees the time embedding, and added-KV attention with masks."""

    def _resnet(self, spec: BlockSpec, in_channels: int, out_channels: int) -> nn.Module:
        return _resnet(spec, in_channels, out_channels)

    def _attend(self, index: int, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: Any, context_mask: Any) -> torch.Tensor:
        return self.attentions[index](hidden_states, context, _mask(mask, context_mask, context))  # type: ignore[attr-defined]


class ResnetDownsampleBlock2D(_ResnetResampling, DownBlock2D):
    """Resnets, then (except at the bottom) a resnet that average-pools by 2; every output is a skip."""

    def _downsampler(self, spec: BlockSpec) -> nn.Module:
        return _resnet(spec, spec.out_channels, spec.out_channels, down=True)

    def _downsample(self, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return self.downsamplers[0](hidden_states, temb)


class SimpleCrossAttnDownBlock2D(ResnetDownsampleBlock2D):
    """:class:`ResnetDownsampleBlock2D` with an added-KV attention after each resnet."""

    has_cross_attention = True

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList | None:
        return nn.ModuleList(_attention(spec, spec.out_channels) for _ in range(spec.num_layers))


class ResnetUpsampleBlock2D(_ResnetResampling, UpBlock2D):
    """Resnets over the hidden states concatenated with one skip each, then a resnet that upsamples by 2."""

    def _upsampler(self, spec: BlockSpec) -> nn.Module:
        return _resnet(spec, spec.out_channels, spec.out_channels, up=True)

    def _upsample(self, hidden_states: torch.Tensor, temb: torch.Tensor | None, upsample_size: Any) -> torch.Tensor:
        return self.upsamplers[0](hidden_states, temb)


class SimpleCrossAttnUpBlock2D(ResnetUpsampleBlock2D):
    """:class:`ResnetUpsampleBlock2D` with an added-KV attention after each resnet."""

    has_cross_attention = True

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList | None:
        return nn.ModuleList(_attention(spec, spec.out_channels) for _ in range(spec.num_layers))


class UNetMidBlock2DSimpleCrossAttn(_ResnetResampling, UNetMidBlock2DCrossAttn):
    """Resnet, then (added-KV attention, resnet) pairs at the lowest resolution."""

    def _resnet(self, spec: BlockSpec, in_channels: int, out_channels: int) -> nn.Module:
        return _resnet(spec, in_channels, out_channels, scale=spec.output_scale_factor)

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList:
        return nn.ModuleList(_attention(spec, spec.in_channels) for _ in range(spec.num_layers))


def _mask(
    attention_mask: torch.Tensor | None, encoder_attention_mask: torch.Tensor | None, context: torch.Tensor | None
) -> torch.Tensor | None:
    if attention_mask is not None:
        return attention_mask
    return encoder_attention_mask if context is not None else None


def register() -> None:
    """Add Kandinsky's blocks and embeddings to the core UNet's registries (idempotent)."""
    register_encoder_hid_projection("image_proj", lambda config, cross_dim: ImageProjection(config["encoder_hid_dim"], cross_dim))
    register_addition_embedding("image", lambda config, time_dim: ImageTimeEmbedding(config["encoder_hid_dim"], time_dim))
    register_block("down", "ResnetDownsampleBlock2D", ResnetDownsampleBlock2D)
    register_block("down", "SimpleCrossAttnDownBlock2D", SimpleCrossAttnDownBlock2D)
    register_block("mid", "UNetMidBlock2DSimpleCrossAttn", UNetMidBlock2DSimpleCrossAttn)
    register_block("up", "SimpleCrossAttnUpBlock2D", SimpleCrossAttnUpBlock2D)
    register_block("up", "ResnetUpsampleBlock2D", ResnetUpsampleBlock2D)


register()
