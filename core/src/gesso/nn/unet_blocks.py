"""The UNet's down, mid and up blocks, the autoencoder's encoder/decoder blocks, and the block registries.

Registries
----------
A UNet config names its blocks (``down_block_types``, ``mid_block_type``, ``up_block_types``);
:class:`~gesso.nn.UNet2DConditionModel` looks each name up in ``DOWN_BLOCKS``, ``MID_BLOCKS`` or
``UP_BLOCKS``. A plugin adds a block with::

    register_block("down", "SimpleCrossAttnDownBlock2D", factory)

where ``factory(spec: BlockSpec) -> nn.Module``. :class:`BlockSpec` carries everything the UNet
derives for block ``spec.index`` from its config (channels, layer counts, heads, norms ...), plus
the whole ``spec.config`` for anything family-specific. The built module must:

* expose ``has_cross_attention: bool``; when true it is called with the keyword arguments
  ``encoder_hidden_states``, ``attention_mask``, ``encoder_attention_mask`` and
  ``cross_attention_kwargs`` in addition to the ones below;
* down: ``block(hidden_states, temb, **cross) -> (hidden_states, skips: tuple[Tensor, ...])``;
* mid: ``block(hidden_states, temb, **cross) -> hidden_states``;
* up: ``block(hidden_states, res_hidden_states_tuple, temb, upsample_size=None, **cross)``
  ``-> hidden_states``, and expose ``resnets`` (it consumes ``len(resnets)`` skips).

A block that hands ``temb`` to nothing but its :class:`~gesso.nn.resnet.ResnetBlock2D` children may
say so with ``time_embedding_feeds_resnets_only = True``: the ``fuse_time_projections``
optimization then computes all their projections of it at once (:mod:`gesso.nn.time_projections`).
Subclasses of the core blocks inherit the declaration; one that hands ``temb`` to anything else
must set it back to False.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gesso.nn.attention import Attention, Transformer2DModel
from gesso.nn.resnet import Downsample2D, NormFactory, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class BlockSpec:
    """What the UNet tells a block factory. Field names follow the reference's config vocabulary.

    For up blocks ``in_channels`` is the channel count of the deepest skip it consumes and
    ``prev_output_channel`` that of the incoming hidden states. ``add_resample`` means
    downsample at the end of a down block, upsample at the end of an up block (unused for mid).
    """

    kind: str
    index: int
    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int
    add_resample: bool = False
    prev_output_channel: int | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int = 1
    attention_head_dim: int | None = None
    cross_attention_dim: int | None = None
    resnet_eps: float = 1e-5
    resnet_act_fn: str = "silu"
    resnet_groups: int | None = 32
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    output_scale_factor: float = 1.0
    downsample_padding: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    cross_attention_norm: str | None = None
    dropout: float = 0.0
    config: Mapping[str, Any] = field(default_factory=dict)


BlockFactory = Callable[[BlockSpec], nn.Module]
DOWN_BLOCKS: dict[str, BlockFactory] = {}
MID_BLOCKS: dict[str, BlockFactory] = {}
UP_BLOCKS: dict[str, BlockFactory] = {}
_REGISTRIES = {"down": DOWN_BLOCKS, "mid": MID_BLOCKS, "up": UP_BLOCKS}
_CONFIG_KEYS = {"down": "down_block_types", "mid": "mid_block_type", "up": "up_block_types"}


def register_block(kind: str, name: str, factory: BlockFactory) -> None:
    """Make ``name`` usable in a UNet config's block types; ``kind`` is "down", "mid" or "up"."""
    if kind not in _REGISTRIES:
        raise ValueError(f"block kind must be one of {sorted(_REGISTRIES)}, got {kind!r}")
    _REGISTRIES[kind][name] = factory


def build_block(name: str, spec: BlockSpec) -> nn.Module:
    """Build a registered block; an unknown name is an error naming the config key and the known names."""
    registry = _REGISTRIES[spec.kind]
    if name not in registry:
        raise ValueError(
            f"{_CONFIG_KEYS[spec.kind]}: unknown block type {name!r}; registered: {sorted(registry)} "
            "(a plugin adds one with gesso.nn.register_block)"
        )
    return registry[name](spec)


def _resnet(
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    eps: float,
    act_fn: str,
    groups: int,
    time_embedding_norm: str = "default",
    output_scale_factor: float = 1.0,
    dropout: float = 0.0,
    norm_factory: NormFactory | None = None,
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        temb_channels,
        groups=groups,
        eps=eps,
        act_fn=act_fn,
        time_embedding_norm=time_embedding_norm,
        output_scale_factor=output_scale_factor,
        dropout=dropout,
        norm_factory=norm_factory,
    )


def _transformers(spec: BlockSpec, channels: int) -> nn.ModuleList:
    layers = spec.transformer_layers_per_block
    layers = (layers,) * spec.num_layers if isinstance(layers, int) else tuple(layers)
    return nn.ModuleList(
        Transformer2DModel(
            spec.num_attention_heads,
            channels // spec.num_attention_heads,
            channels,
            num_layers=layers[i],
            cross_attention_dim=spec.cross_attention_dim,
            norm_num_groups=spec.resnet_groups,
            use_linear_projection=spec.use_linear_projection,
            only_cross_attention=spec.only_cross_attention,
            upcast_attention=spec.upcast_attention,
            dropout=spec.dropout,
        )
        for i in range(spec.num_layers)
    )


def _resnet_from_spec(spec: BlockSpec, in_channels: int, out_channels: int) -> ResnetBlock2D:
    return _resnet(
        in_channels,
        out_channels,
        spec.temb_channels,
        spec.resnet_eps,
        spec.resnet_act_fn,
        spec.resnet_groups,
        spec.resnet_time_scale_shift,
        spec.output_scale_factor,
        spec.dropout,
    )


class DownBlock2D(nn.Module):
    """Resnets, then an optional stride-2 conv; every intermediate output becomes a skip connection."""

    has_cross_attention = False
    time_embedding_feeds_resnets_only = True  # see gesso.nn.time_projections

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            self._resnet(spec, spec.in_channels if i == 0 else spec.out_channels, spec.out_channels) for i in range(spec.num_layers)
        )
        self.attentions = self._attentions(spec)
        self.downsamplers = nn.ModuleList([self._downsampler(spec)]) if spec.add_resample else None

    # Hooks for blocks of other families (Kandinsky's resnet-resampling blocks override them).
    def _resnet(self, spec: BlockSpec, in_channels: int, out_channels: int) -> nn.Module:
        return _resnet_from_spec(spec, in_channels, out_channels)

    def _downsampler(self, spec: BlockSpec) -> nn.Module:
        return Downsample2D(spec.out_channels, use_conv=True, padding=spec.downsample_padding)

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList | None:
        return None

    def _attend(self, index: int, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: Any, context_mask: Any) -> torch.Tensor:
        return self.attentions[index](hidden_states, context, mask, context_mask)

    def _downsample(self, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return self.downsamplers[0](hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self._attend(i, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self._downsample(hidden_states, temb)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class CrossAttnDownBlock2D(DownBlock2D):
    """:class:`DownBlock2D` with a text-conditioned :class:`Transformer2DModel` after each resnet."""

    has_cross_attention = True

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList | None:
        return _transformers(spec, spec.out_channels)


class UpBlock2D(nn.Module):
    """Resnets fed with the hidden states concatenated to one skip each, then an optional 2x upsample."""

    has_cross_attention = False
    time_embedding_feeds_resnets_only = True  # see gesso.nn.time_projections

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        resnets = []
        for i in range(spec.num_layers):
            skip_channels = spec.in_channels if i == spec.num_layers - 1 else spec.out_channels
            incoming = spec.prev_output_channel if i == 0 else spec.out_channels
            resnets.append(self._resnet(spec, incoming + skip_channels, spec.out_channels))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = self._attentions(spec)
        self.upsamplers = nn.ModuleList([self._upsampler(spec)]) if spec.add_resample else None

    # Hooks for blocks of other families (Kandinsky's resnet-resampling blocks override them).
    def _resnet(self, spec: BlockSpec, in_channels: int, out_channels: int) -> nn.Module:
        return _resnet_from_spec(spec, in_channels, out_channels)

    def _upsampler(self, spec: BlockSpec) -> nn.Module:
        return Upsample2D(spec.out_channels, use_conv=True)

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList | None:
        return None

    def _attend(self, index: int, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: Any, context_mask: Any) -> torch.Tensor:
        return self.attentions[index](hidden_states, context, mask, context_mask)

    def _upsample(self, hidden_states: torch.Tensor, temb: torch.Tensor | None, upsample_size: Any) -> torch.Tensor:
        return self.upsamplers[0](hidden_states, upsample_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: torch.Size | tuple[int, int] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        skips = list(res_hidden_states_tuple)
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                hidden_states = self._attend(i, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = self._upsample(hidden_states, temb, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """:class:`UpBlock2D` with a text-conditioned :class:`Transformer2DModel` after each resnet."""

    has_cross_attention = True

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList | None:
        return _transformers(spec, spec.out_channels)


class UNetMidBlock2DCrossAttn(nn.Module):
    """Resnet, then (transformer, resnet) pairs, at the lowest resolution."""

    has_cross_attention = True
    time_embedding_feeds_resnets_only = True  # see gesso.nn.time_projections

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        channels = spec.in_channels
        self.resnets = nn.ModuleList(self._resnet(spec, channels, channels) for _ in range(spec.num_layers + 1))
        self.attentions = self._attentions(spec)

    # Hooks for blocks of other families (Kandinsky's added-KV middle block overrides them).
    def _resnet(self, spec: BlockSpec, in_channels: int, out_channels: int) -> nn.Module:
        return _resnet_from_spec(spec, in_channels, out_channels)

    def _attentions(self, spec: BlockSpec) -> nn.ModuleList:
        return _transformers(spec, spec.in_channels)

    def _attend(self, index: int, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: Any, context_mask: Any) -> torch.Tensor:
        return self.attentions[index](hidden_states, context, mask, context_mask)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            hidden_states = self._attend(i, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """The autoencoders' middle: resnet, then (self-attention, resnet) pairs, no text conditioning.

    The attention is the reference's single-head spatial self-attention (``group_norm``, biased
    q/k/v, residual). With ``norm_factory`` every norm is conditional on ``temb`` (MoVQ's decoder).
    """

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None = None,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        add_attention: bool = True,
        attention_head_dim: int | None = None,
        output_scale_factor: float = 1.0,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        norm_factory: NormFactory | None = None,
    ) -> None:
        super().__init__()
        head_dim = attention_head_dim or in_channels

        def resnet() -> ResnetBlock2D:
            return _resnet(
                in_channels,
                in_channels,
                temb_channels,
                resnet_eps,
                resnet_act_fn,
                resnet_groups,
                resnet_time_scale_shift,
                output_scale_factor,
                dropout,
                norm_factory,
            )

        def attention() -> Attention:
            return Attention(
                in_channels,
                heads=in_channels // head_dim,
                dim_head=head_dim,
                bias=True,
                eps=resnet_eps,
                norm_num_groups=None if norm_factory is not None else resnet_groups,
                residual_connection=True,
                rescale_output_factor=output_scale_factor,
                spatial_norm=norm_factory(in_channels) if norm_factory is not None else None,
            )

        self.add_attention = add_attention
        self.attentions = nn.ModuleList(attention() for _ in range(num_layers)) if add_attention else None
        self.resnets = nn.ModuleList(resnet() for _ in range(num_layers + 1))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, temb=temb)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class DownEncoderBlock2D(nn.Module):
    """An encoder stage: resnets without time embedding, then an optional stride-2 conv (no skips kept)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        add_downsample: bool = True,
        downsample_padding: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, None, resnet_eps, resnet_act_fn, resnet_groups, dropout=dropout)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)]) if add_downsample else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """A decoder stage: resnets, then an optional 2x upsample. ``temb`` only feeds conditional norms."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        add_upsample: bool = True,
        temb_channels: int | None = None,
        dropout: float = 0.0,
        norm_factory: NormFactory | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels,
                resnet_eps,
                resnet_act_fn,
                resnet_groups,
                dropout=dropout,
                norm_factory=norm_factory,
            )
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


register_block("down", "DownBlock2D", DownBlock2D)
register_block("down", "CrossAttnDownBlock2D", CrossAttnDownBlock2D)
register_block("mid", "UNetMidBlock2DCrossAttn", UNetMidBlock2DCrossAttn)
register_block("up", "UpBlock2D", UpBlock2D)
register_block("up", "CrossAttnUpBlock2D", CrossAttnUpBlock2D)
register_block(
    "mid",
    "UNetMidBlock2D",  # a single resnet, no attention (what the reference builds for this name)
    lambda spec: UNetMidBlock2D(
        spec.in_channels,
        spec.temb_channels,
        num_layers=0,
        resnet_eps=spec.resnet_eps,
        resnet_act_fn=spec.resnet_act_fn,
        resnet_groups=spec.resnet_groups,
        add_attention=False,
        output_scale_factor=spec.output_scale_factor,
        resnet_time_scale_shift=spec.resnet_time_scale_shift,
        dropout=spec.dropout,
    ),
)
