"""Residual blocks and the 2x resamplers shared by the UNet and the autoencoders."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gesso.nn.activations import get_activation
from gesso.nn.normalization import GroupNorm

NormFactory = Callable[[int], nn.Module]
"""Builds a conditional norm for ``num_channels``; the module is called as ``norm(x, cond)``.

Used for decoders whose norms are conditioned on the latent (MoVQ's spatial norm): a resnet block
given one uses it for both of its norms and treats its ``temb`` argument as that condition.
"""


class Downsample2D(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv, or 2x2 average pooling without ``use_conv``.

    ``padding=0`` pads right/bottom by one first (the VAE encoder's asymmetric convention).
    """

    compile_region = True  # compiled on its own by the regional compile (gesso.optimize.compile)

    def __init__(
        self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1, kernel_size: int = 3
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv: nn.Module = nn.Conv2d(channels, self.out_channels, kernel_size, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double the resolution (or reach ``output_size``) by nearest interpolation, then an optional 3x3 conv.

    ``output_size`` lets the UNet match a skip connection whose size is odd.
    """

    compile_region = True  # compiled on its own by the regional compile (gesso.optimize.compile)

    def __init__(
        self, channels: int, use_conv: bool = False, out_channels: int | None = None, kernel_size: int = 3, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size, padding=padding) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        return self.conv(hidden_states) if self.conv is not None else hidden_states


class ResnetBlock2D(nn.Module):
    """Norm-act-conv twice with a (projected) shortcut, conditioned on the time embedding.

    ``time_embedding_norm``: ``"default"`` adds the projected embedding after ``conv1``;
    ``"scale_shift"`` projects to twice the channels and modulates the output of ``norm2``
    (``h * (1 + scale) + shift``, as Kandinsky's UNet does). With ``norm_factory`` the two
    GroupNorms are replaced by conditional norms fed with ``temb`` and there is no projection.
    ``up``/``down`` resample inside the block (nearest / average pool), before ``conv1``.
    """

    compile_region = True  # compiled on its own by the regional compile (gesso.optimize.compile)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        act_fn: str = "silu",
        time_embedding_norm: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: int | None = None,
        norm_factory: NormFactory | None = None,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"unknown time_embedding_norm {time_embedding_norm!r}; known: 'default', 'scale_shift'")
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.conditional_norm = norm_factory is not None
        # Set by fuse_time_projections: temb arrives as this resnet's projection, computed with all the others'.
        self.time_projected = False

        if norm_factory is not None:
            self.norm1: nn.Module = norm_factory(in_channels)
        else:
            self.norm1 = GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj: nn.Linear | None = None
        if temb_channels is not None and norm_factory is None:
            scale = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, scale * out_channels)
        if norm_factory is not None:
            self.norm2: nn.Module = norm_factory(out_channels)
        else:
            self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(act_fn)

        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample2D(in_channels)
        elif down:
            self.resample = Downsample2D(in_channels)

        if use_in_shortcut is None:
            use_in_shortcut = in_channels != conv_2d_out_channels
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=conv_shortcut_bias) if use_in_shortcut else None
        )

    def _norm(self, norm: nn.Module, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return norm(x, temb) if self.conditional_norm else norm(x)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.nonlinearity(self._norm(self.norm1, input_tensor, temb))
        if self.resample is not None:
            input_tensor = self.resample(input_tensor)
            hidden_states = self.resample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        time_scale_shift = None
        if self.time_emb_proj is not None and temb is not None:
            if self.time_projected:  # temb is already this resnet's columns of the joint projection
                projected = temb[:, :, None, None]
            else:
                projected = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))[:, :, None, None]
            if self.time_embedding_norm == "default":
                hidden_states = hidden_states + projected
            else:
                time_scale_shift = projected.chunk(2, dim=1)
        elif self.time_embedding_norm == "scale_shift" and not self.conditional_norm:
            raise ValueError("time_embedding_norm 'scale_shift' needs a time embedding (temb)")

        hidden_states = self._norm(self.norm2, hidden_states, temb)
        if time_scale_shift is not None:
            scale, shift = time_scale_shift
            hidden_states = hidden_states * (1 + scale) + shift
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))

        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor
