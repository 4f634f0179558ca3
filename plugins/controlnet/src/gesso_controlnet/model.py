"""The ControlNet: a trainable copy of the UNet's encoder that turns a control image into residuals.

The net runs the UNet's ``conv_in``, down blocks and mid block (built by the core's
``down_block_specs`` / ``mid_block_spec``, so the same config keys give the same blocks) on the
noisy latent plus an embedding of the control image. Each skip tensor and the mid-block output go
through a 1x1 convolution (zero-initialised in training) and come out as the residuals the UNet adds
to its skips (``down_block_additional_residuals``) and mid-block output. Module and parameter names
are the published checkpoints' (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``,
``controlnet_mid_block``), so those load as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from gesso.configuration import register_to_config
from gesso.modeling import ModelMixin
from gesso.nn.embeddings import TimestepEmbedding, Timesteps
from gesso.nn.time_projections import TimeProjections, fuse_resnet_time_projections
from gesso.nn.unet_2d_condition import (
    ADDITION_EMBEDDINGS,
    ENCODER_HID_PROJECTIONS,
    addition_embedding,
    down_block_specs,
    mid_block_spec,
    register_precomputed_conditioning,
)
from gesso.nn.unet_blocks import UNetMidBlock2D, build_block
from torch import nn
from torch.nn import functional as F


@dataclass
class ControlNetOutput:
    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (pixel space) -> a feature map at latent resolution with the UNet's first width.

    A 3x3 convolution, then for each further width a (3x3, stride-1) and a (3x3, stride-2)
    convolution, each followed by SiLU; three halvings bring 512 pixels to 64 latents.
    """

    def __init__(
        self, conditioning_embedding_channels: int, conditioning_channels: int = 3, block_out_channels: Sequence[int] = (16, 32, 96, 256)
    ) -> None:
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for width, next_width in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(width, width, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(width, next_width, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], conditioning_embedding_channels, kernel_size=3, padding=1)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        features = F.silu(self.conv_in(conditioning))
        for conv in self.blocks:
            features = F.silu(conv(features))
        return self.conv_out(features)


_UNSUPPORTED = {"class_embed_type": None, "num_class_embeds": None}


def _registered(registry: Mapping[str, Any], key: str, name: str) -> Any:
    """A factory from one of the UNet's registries (which plugins extend), or an error naming the key."""
    if name not in registry:
        raise ValueError(f"{key}: unknown type {name!r}; registered: {sorted(registry)}")
    return registry[name]


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``(B, N)`` keep-mask -> an additive ``(B, 1, N)`` bias, -10000 where a token is dropped."""
    return None if mask is None else ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class ControlNetModel(ModelMixin):
    """A ControlNet for SD1.x/2.x (text conditioning) or SDXL (also ``text_time`` added conditioning).

    ``forward`` returns ``(down_block_res_samples, mid_block_res_sample)`` scaled by
    ``conditioning_scale``; in guess mode the scales grow logarithmically from 0.1 (first skip) to
    1.0 (mid block), as the reference does. ``global_pool_conditions`` nets return spatial means.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | Sequence[int] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: Sequence[int] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ) -> None:
        super().__init__()
        for key, supported in _UNSUPPORTED.items():
            if self.config[key] != supported:
                raise NotImplementedError(f"{key}={self.config[key]!r} is not supported (only {supported!r})")
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"block_out_channels and down_block_types must have the same length, got {len(block_out_channels)} and {len(down_block_types)}"
            )
        if controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order: unknown order {controlnet_conditioning_channel_order!r} (rgb or bgr)")
        if encoder_hid_dim is not None and encoder_hid_dim_type is None:
            encoder_hid_dim_type = "text_proj"  # the reference's implicit default
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if encoder_hid_dim_type is not None and encoder_hid_dim is None:
            raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r} needs encoder_hid_dim")

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn)
        # Built for the checkpoints' weight layout; like the reference's ControlNet, forward does not apply it.
        self.encoder_hid_proj = None
        if encoder_hid_dim_type is not None:
            self.encoder_hid_proj = _registered(ENCODER_HID_PROJECTIONS, "encoder_hid_dim_type", encoder_hid_dim_type)(
                self.config, cross_attention_dim
            )
        self.add_embedding = None
        if addition_embed_type is not None:
            self.add_embedding = _registered(ADDITION_EMBEDDINGS, "addition_embed_type", addition_embed_type)(self.config, time_embed_dim)

        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            block_out_channels[0], conditioning_channels, conditioning_embedding_out_channels or (16, 32, 96, 256)
        )

        # The UNet's encoder, from the same config vocabulary; one 1x1 projection per skip tensor.
        down_specs = down_block_specs(self.config, time_embed_dim)
        self.down_blocks = nn.ModuleList(build_block(name, spec) for name, spec in down_specs)
        skip_channels = [block_out_channels[0]]
        for _, spec in down_specs:
            skip_channels += [spec.out_channels] * (spec.num_layers + int(spec.add_resample))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for c in skip_channels)

        mid_channels = block_out_channels[-1]
        self.controlnet_mid_block = nn.Conv2d(mid_channels, mid_channels, kernel_size=1)
        if mid_block_type == "UNetMidBlock2D":  # the reference's attention-free variant: two resnets
            self.mid_block = UNetMidBlock2D(
                mid_channels,
                time_embed_dim,
                num_layers=0,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                add_attention=False,
                output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
            )
        else:
            mid = mid_block_spec(self.config, time_embed_dim)
            self.mid_block = build_block(*mid) if mid is not None else None
        self.time_projections: TimeProjections | None = None  # see fuse_time_projections
        # The control image's embedding, when ``control_embedding_once`` computed it for this call's
        # image ahead of the step (gesso_controlnet.optimize); a buffer, so that compiled code takes it
        # as an input. Non-persistent: the state dict keeps the published weights only.
        self.register_buffer("control_embedding", None, persistent=False)
        register_precomputed_conditioning(self)  # the addition embedding, once an image (conditioning_once)

    #: Every cross-attention attends to ``encoder_hidden_states`` as given (``cross_kv_once``).
    cross_attention_context_is_input = True

    def embed_control(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """The control image (channels in the config's order) as a feature map at latent resolution:
        what each step adds to ``conv_in``'s output, the same at every step of an image."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        return self.controlnet_cond_embedding(controlnet_cond)

    def fuse_time_projections(self) -> bool:
        """Project the time embedding for all the resnets in one product a step (the
        ``fuse_time_projections`` optimization); False where a block does not allow it."""
        if self.time_projections is None:
            self.time_projections = fuse_resnet_time_projections([*self.down_blocks, self.mid_block])
        return self.time_projections is not None

    def _time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            mps = sample.device.type == "mps"
            dtype = (torch.float32 if mps else torch.float64) if isinstance(timestep, float) else (torch.int32 if mps else torch.int64)
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device).expand(sample.shape[0])
        return self.time_embedding(self.time_proj(timestep).to(sample.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the UNet from the noisy ``sample`` and the ``controlnet_cond`` image in [0, 1].

        ``attention_mask`` is a keep-mask ``(B, N)`` over the text tokens (1 keeps a token).
        """
        emb = self._time_embedding(sample, timestep)
        if self.add_embedding is not None:
            emb = emb + addition_embedding(self, emb, encoder_hidden_states, added_cond_kwargs or {})
        if self.time_projections is not None:  # the blocks' resnets take their columns of it
            emb = self.time_projections(emb)
        cross = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=_mask_to_bias(attention_mask, sample.dtype),
            encoder_attention_mask=None,
            cross_attention_kwargs=cross_attention_kwargs,
        )

        control = self.control_embedding if self.control_embedding is not None else self.embed_control(controlnet_cond)
        hidden_states = self.conv_in(sample) + control
        skips = [hidden_states]
        for block in self.down_blocks:
            hidden_states, block_skips = block(hidden_states, emb, **cross) if block.has_cross_attention else block(hidden_states, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            hidden_states = (
                self.mid_block(hidden_states, emb, **cross) if self.mid_block.has_cross_attention else self.mid_block(hidden_states, emb)
            )

        down = [projection(skip) for skip, projection in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(hidden_states)
        if guess_mode and not self.config.global_pool_conditions:
            # Logarithmic ramp from 0.1 to 1.0 over the skips, the mid block taking the last value.
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [residual * scale for residual, scale in zip(down, scales)]
            mid = mid * scales[-1]
        elif not (isinstance(conditioning_scale, int | float) and conditioning_scale == 1):  # x * 1 is x: no kernels for it
            down = [residual * conditioning_scale for residual in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlNetOutput(down, mid) if return_dict else (down, mid)


class MultiControlNetModel(ModelMixin):
    """Several ControlNets run on the same latent, each with its own image and scale; residuals summed."""

    def __init__(self, controlnets: Sequence[ControlNetModel]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(controlnets)

    #: Each net's cross-attentions attend to ``encoder_hidden_states`` as given (``cross_kv_once``).
    cross_attention_context_is_input = True

    @property
    def conditioning_passed_to(self) -> list[ControlNetModel]:
        """The nets, each called with this module's ``encoder_hidden_states`` and ``added_cond_kwargs``
        as given: ``conditioning_once`` computes their SDXL addition embeddings ahead."""
        return list(self.nets)

    @property
    def config(self) -> Any:  # type: ignore[override]
        """The first net's config (what the pipelines read: channel order, global pooling)."""
        return self.nets[0].config

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: Sequence[torch.Tensor],
        conditioning_scale: Sequence[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets, strict=True):
            net_down, net_mid = net(
                sample,
                timestep,
                encoder_hidden_states,
                image,
                scale,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if down is None:
                down, mid = net_down, net_mid
            else:
                down = [total + residual for total, residual in zip(down, net_down)]
                mid = mid + net_mid
        assert down is not None and mid is not None
        return ControlNetOutput(down, mid) if return_dict else (down, mid)

    def save_pretrained(self, save_directory: Any, **options: Any) -> None:
        """Each net in its own folder: ``save_directory``, then ``save_directory_1``, ``_2`` ..."""
        from pathlib import Path

        base = Path(save_directory)
        for index, net in enumerate(self.nets):
            net.save_pretrained(base if index == 0 else base.with_name(f"{base.name}_{index}"), **options)

    @classmethod
    def from_pretrained(cls, pretrained_model_path: Any, **options: Any) -> MultiControlNetModel:  # type: ignore[override]
        """Load ``path``, ``path_1``, ``path_2`` ... as saved by :meth:`save_pretrained`."""
        from pathlib import Path

        base = Path(pretrained_model_path)
        nets, index = [], 0
        while (folder := base if index == 0 else base.with_name(f"{base.name}_{index}")).is_dir():
            nets.append(ControlNetModel.from_pretrained(folder, **options))
            index += 1
        if not nets:
            raise OSError(f"no ControlNet found at {base}")
        return cls(nets)
