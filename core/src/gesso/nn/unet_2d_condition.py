"""The text-conditioned UNet of Stable Diffusion 1.x / 2.x / XL, built from its ``config.json``.

Family-specific parts are looked up by the names the config uses, in registries a plugin can add to:

* blocks: ``register_block(kind, name, factory)`` (see :mod:`gesso.nn.unet_blocks`);
* ``addition_embed_type``: ``register_addition_embedding(name, factory)`` with
  ``factory(config, time_embed_dim) -> nn.Module``; the module becomes ``unet.add_embedding``
  and is called as ``module(emb=..., encoder_hidden_states=..., added_cond_kwargs=...)``; its
  result is added to the timestep embedding;
* ``encoder_hid_dim_type``: ``register_encoder_hid_projection(name, factory)`` with
  ``factory(config, cross_attention_dim) -> nn.Module``; the module becomes
  ``unet.encoder_hid_proj`` and is called as ``module(encoder_hidden_states, added_cond_kwargs)``;
  its result replaces the states the cross-attentions see.

Either module may set the class attribute ``per_image = True``: it promises that its result
depends only on ``encoder_hidden_states``, ``added_cond_kwargs`` and its own weights (not on
``emb``), which lets ``conditioning_once`` compute it once an image instead of at every step.

``config`` is the UNet's own config (``unet.config``), so a factory can read any key it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gesso.configuration import register_to_config
from gesso.modeling import ModelMixin
from gesso.nn.activations import get_activation
from gesso.nn.embeddings import TextProjection, TextTimeEmbedding, TimestepEmbedding, Timesteps
from gesso.nn.normalization import OutputGroupNorm
from gesso.nn.time_projections import TimeProjections, fuse_resnet_time_projections
from gesso.nn.unet_blocks import BlockSpec, build_block
from gesso.streams import arrived

AdditionEmbeddingFactory = Callable[[Mapping[str, Any], int], nn.Module]
EncoderHidProjectionFactory = Callable[[Mapping[str, Any], Any], nn.Module]
ADDITION_EMBEDDINGS: dict[str, AdditionEmbeddingFactory] = {}
ENCODER_HID_PROJECTIONS: dict[str, EncoderHidProjectionFactory] = {}


def register_addition_embedding(name: str, factory: AdditionEmbeddingFactory) -> None:
    """Make ``addition_embed_type=name`` buildable (see the module docstring for the protocol)."""
    ADDITION_EMBEDDINGS[name] = factory


def register_encoder_hid_projection(name: str, factory: EncoderHidProjectionFactory) -> None:
    """Make ``encoder_hid_dim_type=name`` buildable (see the module docstring for the protocol)."""
    ENCODER_HID_PROJECTIONS[name] = factory


def _lookup(registry: Mapping[str, Callable[..., nn.Module]], key: str, name: str) -> Callable[..., nn.Module]:
    if name not in registry:
        raise ValueError(f"{key}: unknown type {name!r}; registered: {sorted(registry)} (plugins register more)")
    return registry[name]


def _text_time(config: Mapping[str, Any], time_embed_dim: int) -> nn.Module:
    if config["addition_time_embed_dim"] is None or config["projection_class_embeddings_input_dim"] is None:
        raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and projection_class_embeddings_input_dim")
    return TextTimeEmbedding(
        config["projection_class_embeddings_input_dim"],
        time_embed_dim,
        config["addition_time_embed_dim"],
        config["flip_sin_to_cos"],
        config["freq_shift"],
    )


register_addition_embedding("text_time", _text_time)
register_encoder_hid_projection("text_proj", lambda config, cross_dim: TextProjection(config["encoder_hid_dim"], cross_dim))


def register_precomputed_conditioning(model: nn.Module) -> None:
    """Give ``model`` the slots where ``conditioning_once`` (gesso.optimize.conditioning_once) puts its
    per-image conditioning computed ahead of the step: the addition embedding's result and the
    projected context. Buffers, so that compiled code takes them as inputs; non-persistent, so that
    the state dict keeps the published weights only."""
    model.register_buffer("precomputed_addition", None, persistent=False)
    model.register_buffer("precomputed_context", None, persistent=False)


def addition_embedding(
    model: nn.Module, emb: torch.Tensor, encoder_hidden_states: torch.Tensor | None, added_cond_kwargs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """What ``model.add_embedding`` gives for this call: computed ahead for this very input, or now."""
    if model.precomputed_addition is not None:
        return model.precomputed_addition
    return model.add_embedding(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)


def projected_context(
    model: nn.Module, encoder_hidden_states: torch.Tensor | None, added_cond_kwargs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """What ``model.encoder_hid_proj`` gives for this call: computed ahead for this very input, or now."""
    if model.precomputed_context is not None:
        return model.precomputed_context
    return model.encoder_hid_proj(encoder_hidden_states, added_cond_kwargs)


@dataclass
class UNet2DConditionOutput:
    sample: torch.Tensor


def _per_block(key: str, value: Any, count: int) -> list[Any]:
    """A scalar config value repeated per down block, or a per-block list checked for length."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{key}: expected {count} values (one per down block), got {len(value)}")
        return list(value)
    return [value] * count


def block_settings(config: Mapping[str, Any], time_embed_dim: int) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """The per-block lists a UNet-shaped model derives from ``config``, and what all its blocks share.

    ``config`` is a UNet config or any config in the same vocabulary (a ControlNet's: keys it lacks
    take the UNet's defaults). The lists, one value per down block, are ``heads``, ``head_dims``,
    ``cross_dims``, ``layers``, ``transformer_layers`` and ``cross_only``; the shared settings are
    :class:`BlockSpec` fields.
    """
    blocks = len(config["down_block_types"])
    num_heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim", 8)
    per_block = dict(
        heads=_per_block("attention_head_dim" if num_heads is None else "num_attention_heads", num_heads or head_dim, blocks),
        head_dims=_per_block("attention_head_dim", head_dim, blocks),
        cross_dims=_per_block("cross_attention_dim", config.get("cross_attention_dim", 1280), blocks),
        layers=_per_block("layers_per_block", config.get("layers_per_block", 2), blocks),
        transformer_layers=_per_block("transformer_layers_per_block", config.get("transformer_layers_per_block", 1), blocks),
        cross_only=_per_block("only_cross_attention", config.get("only_cross_attention", False), blocks),
    )
    common = dict(
        temb_channels=time_embed_dim,
        resnet_eps=config.get("norm_eps", 1e-5),
        resnet_act_fn=config.get("act_fn", "silu"),
        resnet_groups=config.get("norm_num_groups", 32),
        resnet_time_scale_shift=config.get("resnet_time_scale_shift", "default"),
        resnet_skip_time_act=config.get("resnet_skip_time_act", False),
        resnet_out_scale_factor=config.get("resnet_out_scale_factor", 1.0),
        use_linear_projection=config.get("use_linear_projection", False),
        upcast_attention=config.get("upcast_attention", False),
        cross_attention_norm=config.get("cross_attention_norm"),
        dropout=config.get("dropout", 0.0),
        config=config,
    )
    return per_block, common


def down_block_specs(config: Mapping[str, Any], time_embed_dim: int) -> list[tuple[str, BlockSpec]]:
    """``(block type, spec)`` of each down block, as the UNet derives them from its config."""
    per_block, common = block_settings(config, time_embed_dim)
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    names = list(config["down_block_types"])
    specs = []
    for i, name in enumerate(names):
        spec = BlockSpec(
            kind="down",
            index=i,
            in_channels=channels[max(i - 1, 0)],
            out_channels=channels[i],
            num_layers=per_block["layers"][i],
            add_resample=i < len(names) - 1,
            transformer_layers_per_block=per_block["transformer_layers"][i],
            num_attention_heads=per_block["heads"][i],
            attention_head_dim=per_block["head_dims"][i] or channels[i],
            cross_attention_dim=per_block["cross_dims"][i],
            downsample_padding=config.get("downsample_padding", 1),
            only_cross_attention=per_block["cross_only"][i],
            **common,
        )
        specs.append((name, spec))
    return specs


def mid_block_spec(config: Mapping[str, Any], time_embed_dim: int) -> tuple[str, BlockSpec] | None:
    """``(block type, spec)`` of the mid block, as the UNet derives it (None when ``mid_block_type`` is None)."""
    name = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if name is None:
        return None
    per_block, common = block_settings(config, time_embed_dim)
    only_cross = config.get("only_cross_attention", False)
    mid_only_cross = config.get("mid_block_only_cross_attention")
    if mid_only_cross is None:
        mid_only_cross = only_cross if isinstance(only_cross, bool) else False
    channels = config.get("block_out_channels", (320, 640, 1280, 1280))[-1]
    spec = BlockSpec(
        kind="mid",
        index=0,
        in_channels=channels,
        out_channels=channels,
        num_layers=1,
        transformer_layers_per_block=per_block["transformer_layers"][-1],
        num_attention_heads=per_block["heads"][-1],
        attention_head_dim=per_block["head_dims"][-1],
        cross_attention_dim=per_block["cross_dims"][-1],
        output_scale_factor=config.get("mid_block_scale_factor", 1),
        only_cross_attention=mid_only_cross,
        **common,
    )
    return name, spec


_UNSUPPORTED = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "attention_type": "default",
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
}


class UNet2DConditionModel(ModelMixin):
    """Predicts noise (or v) from a noisy latent, a timestep and text states.

    ``attention_head_dim`` keeps the reference's historical meaning: when ``num_attention_heads``
    is None (every SD checkpoint), it is the number of heads of each block's transformers.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int | Sequence[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | Sequence[int] = 1280,
        transformer_layers_per_block: int | Sequence[Any] = 1,
        reverse_transformer_layers_per_block: Sequence[Any] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ) -> None:
        super().__init__()
        for key, supported in _UNSUPPORTED.items():
            if self.config[key] != supported:
                raise NotImplementedError(f"{key}={self.config[key]!r} is not supported (only {supported!r})")
        blocks = len(down_block_types)
        if len(up_block_types) != blocks or len(block_out_channels) != blocks:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        if encoder_hid_dim is not None and encoder_hid_dim_type is None:
            encoder_hid_dim_type = "text_proj"  # the reference's implicit default
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)

        # Timestep -> embedding (plus whatever the family adds to it).
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, act_fn, post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim
        )
        self.encoder_hid_proj = None
        if encoder_hid_dim_type is not None:
            factory = _lookup(ENCODER_HID_PROJECTIONS, "encoder_hid_dim_type", encoder_hid_dim_type)
            self.encoder_hid_proj = factory(self.config, cross_attention_dim)
        self.add_embedding = None
        if addition_embed_type is not None:
            factory = _lookup(ADDITION_EMBEDDINGS, "addition_embed_type", addition_embed_type)
            self.add_embedding = factory(self.config, time_embed_dim)
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn else None

        # Down and mid blocks: derived from the config by helpers a ControlNet (same encoder) reuses.
        self.down_blocks = nn.ModuleList(build_block(name, spec) for name, spec in down_block_specs(self.config, time_embed_dim))
        mid = mid_block_spec(self.config, time_embed_dim)
        self.mid_block = build_block(*mid) if mid is not None else None

        per_block, common = block_settings(self.config, time_embed_dim)
        heads, head_dims, cross_dims, layers, transformer_layers, cross_only = per_block.values()
        reversed_channels = list(reversed(block_out_channels))
        reversed_transformer_layers = list(reverse_transformer_layers_per_block or reversed(transformer_layers))
        self.up_blocks = nn.ModuleList()
        for i, name in enumerate(up_block_types):
            spec = BlockSpec(
                kind="up",
                index=i,
                in_channels=reversed_channels[min(i + 1, blocks - 1)],
                out_channels=reversed_channels[i],
                prev_output_channel=reversed_channels[max(i - 1, 0)],
                num_layers=layers[blocks - 1 - i] + 1,
                add_resample=i < blocks - 1,
                transformer_layers_per_block=reversed_transformer_layers[i],
                num_attention_heads=heads[blocks - 1 - i],
                # The reference does not reverse attention_head_dim for up blocks; kept for weight compatibility.
                attention_head_dim=head_dims[i] or reversed_channels[i],
                cross_attention_dim=cross_dims[blocks - 1 - i],
                only_cross_attention=cross_only[blocks - 1 - i],
                **common,
            )
            self.up_blocks.append(build_block(name, spec))
        self.num_upsamplers = blocks - 1

        self.time_projections: TimeProjections | None = None  # see fuse_time_projections
        register_precomputed_conditioning(self)
        self.conv_norm_out = OutputGroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps) if norm_num_groups else None
        self.conv_act = get_activation(act_fn) if norm_num_groups else None
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2)

    @property
    def cross_attention_context_is_input(self) -> bool:
        """Whether every cross-attention attends to ``encoder_hidden_states`` as passed to ``forward``
        (no ``encoder_hid_proj`` in between): what lets ``cross_kv_once`` project it ahead."""
        return self.encoder_hid_proj is None

    def fuse_time_projections(self) -> bool:
        """Project the time embedding for all the resnets in one product a step (the
        ``fuse_time_projections`` optimization); False where a block does not allow it."""
        if self.time_projections is None:
            self.time_projections = fuse_resnet_time_projections([*self.down_blocks, self.mid_block, *self.up_blocks])
        return self.time_projections is not None

    def _time_features(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Sinusoidal features of ``timestep`` (number, 0-d or 1-d tensor), broadcast to the batch."""
        if not torch.is_tensor(timestep):
            mps = sample.device.type == "mps"  # no float64/int64 there
            dtype = (torch.float32 if mps else torch.float64) if isinstance(timestep, float) else (torch.int32 if mps else torch.int64)
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device).expand(sample.shape[0])
        return self.time_proj(timestep).to(sample.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Denoise one step. ``down_block_additional_residuals`` (one per skip connection) and
        ``mid_block_additional_residual`` are added to the skips and to the mid-block output: this
        is how a ControlNet steers the UNet; each is applied on its own (the reference reads
        down-only residuals as T2I-Adapter input instead). Either may be a ``gesso.streams.InFlight``
        still being computed on another CUDA stream: the down blocks and the mid block run before
        the UNet waits for it. Masks are keep-masks ``(B, N)`` (1 keeps a token).
        ``cross_attention_kwargs`` is handed to cross-attention blocks for plugin blocks to use; the
        built-in blocks ignore it (there are no swappable attention processors).
        """
        added_cond_kwargs = added_cond_kwargs or {}
        # Odd sizes: upsamplers must then reach the skip's exact size instead of simply doubling.
        forward_upsample_size = any(dim % 2**self.num_upsamplers for dim in sample.shape[-2:])
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self.time_embedding(self._time_features(sample, timestep), timestep_cond)
        if self.add_embedding is not None:
            emb = emb + addition_embedding(self, emb, encoder_hidden_states, added_cond_kwargs)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.time_projections is not None:  # the blocks' resnets take their columns of it
            emb = self.time_projections(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = projected_context(self, encoder_hidden_states, added_cond_kwargs)
        cross = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=_mask_to_bias(attention_mask, sample.dtype),
            encoder_attention_mask=_mask_to_bias(encoder_attention_mask, sample.dtype),
            cross_attention_kwargs=cross_attention_kwargs,
        )

        hidden_states = self.conv_in(sample)
        skips: list[torch.Tensor] = [hidden_states]
        for block in self.down_blocks:
            hidden_states, block_skips = block(hidden_states, emb, **cross) if block.has_cross_attention else block(hidden_states, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            hidden_states = (
                self.mid_block(hidden_states, emb, **cross) if self.mid_block.has_cross_attention else self.mid_block(hidden_states, emb)
            )
        # Residuals may still be computed on another stream (gesso.streams): the down blocks and the
        # mid block above ran alongside that work, as neither reads them; from here on the UNet does.
        down_block_additional_residuals = arrived(down_block_additional_residuals)
        mid_block_additional_residual = arrived(mid_block_additional_residual)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals: expected {len(skips)} tensors, got {len(down_block_additional_residuals)}"
                )
            skips = [skip + extra for skip, extra in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            hidden_states = hidden_states + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = tuple(skips[-count:]), skips[:-count]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            if block.has_cross_attention:
                hidden_states = block(hidden_states, block_skips, emb, upsample_size=upsample_size, **cross)
            else:
                hidden_states = block(hidden_states, block_skips, emb, upsample_size=upsample_size)

        if self.conv_norm_out is not None:
            hidden_states = self.conv_act(self.conv_norm_out(hidden_states))
        sample = self.conv_out(hidden_states)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``(B, N)`` keep-mask becomes an additive ``(B, 1, N)`` bias (-10000 where dropped), as the reference does."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
