"""Attention and the transformer blocks that UNets put between their resnets.

All attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels where the device has them), or through what an optimization set as a
module's ``sdpa`` (``decoder_attention_bf16x3``: a float32 decoder's, on tensor cores). Module and
parameter names follow the reference (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ``proj_in`` ...) so
published weights load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gesso.nn.normalization import GroupNorm


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention over tokens ``(B, N, C)`` or feature maps ``(B, C, H, W)``.

    The options are those the published models use: the VAE's single-head self-attention has a
    ``group_norm`` in front, a residual connection and biased projections; the UNet's attentions
    have unbiased q/k/v. ``spatial_norm`` (a conditional norm called as ``norm(x, temb)``) is for
    decoders conditioned on the latent. ``upcast_attention`` is recorded for completeness: SDPA
    already accumulates the softmax in float32 in its fused kernels.
    """

    #: Runs the attention in place of ``F.scaled_dot_product_attention`` (same arguments), where an
    #: optimization set one on the module (``decoder_attention_bf16x3``).
    sdpa: Callable[..., torch.Tensor] | None = None

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        spatial_norm: nn.Module | None = None,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.spatial_norm = spatial_norm
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups else None
        kv_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, out_dim or query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.fused: str | None = None  # "qkv" or "kv" once fuse_projections() ran
        # The prompt's keys and values, when ``cross_kv_once`` computed them for this call's context
        # ahead of the step (gesso.optimize.cross_kv); buffers, so that compiled code takes them as
        # inputs. Non-persistent: the state dict keeps the published weights only.
        self.register_buffer("text_key", None, persistent=False)
        self.register_buffer("text_value", None, persistent=False)

    @torch.no_grad()
    def fuse_projections(self, self_attention: bool) -> None:
        """One matrix product for q, k and v (k and v for cross-attention) instead of three.

        The fused weight is a new tensor and ``to_q`` / ``to_k`` / ``to_v`` become views into it, so
        memory does not grow and the state dict keeps the published names and values.
        """
        projections = [self.to_q, self.to_k, self.to_v] if self_attention else [self.to_k, self.to_v]
        if len({p.in_features for p in projections}) != 1 or self.fused is not None:
            return
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if projections[0].bias is not None else None
        offset = 0
        for projection in projections:
            rows = projection.out_features
            projection.weight = nn.Parameter(weight[offset : offset + rows], requires_grad=False)
            if bias is not None:
                projection.bias = nn.Parameter(bias[offset : offset + rows], requires_grad=False)
            offset += rows
        # Non-persistent: the state dict keeps only the published to_q / to_k / to_v.
        self.register_buffer("fused_weight", weight, persistent=False)
        self.register_buffer("fused_bias", bias, persistent=False)
        self.fused = "qkv" if self_attention else "kv"

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of cross-attention over ``context`` (one product once k/v are fused)."""
        if self.fused == "kv":
            key, value = F.linear(context, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
            return key, value
        return self.to_k(context), self.to_v(context)

    def context_parameters(self) -> list[torch.Tensor]:
        """The weights :meth:`project_context` reads."""
        return [p for linear in (self.to_k, self.to_v) for p in linear.parameters()]

    def _project(self, hidden_states: torch.Tensor, context: torch.Tensor, is_self: bool) -> tuple[torch.Tensor, ...]:
        if self.fused == "qkv" and is_self:
            return F.linear(hidden_states, self.fused_weight, self.fused_bias).chunk(3, dim=-1)
        if is_self:
            return self.to_q(hidden_states), self.to_k(context), self.to_v(context)
        if self.text_key is not None:  # computed for this very context before the step
            return self.to_q(hidden_states), self.text_key, self.text_value
        return self.to_q(hidden_states), *self.project_context(context)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` is an additive bias ``(B, 1, N_kv)`` or ``(B, N_q, N_kv)``, or a bool keep-mask."""
        residual = hidden_states
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, temb)
        feature_map = hidden_states.ndim == 4
        if feature_map:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = (self._split_heads(x) for x in self._project(hidden_states, context, encoder_hidden_states is None))
        if attention_mask is not None and attention_mask.ndim == 3:
            attention_mask = attention_mask[:, None]  # broadcast over heads
        out = (self.sdpa or F.scaled_dot_product_attention)(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        out = self.to_out[1](self.to_out[0](out))

        if feature_map:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, half of it gating the other half."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP; ``net`` is a ModuleList only so that the weights are named ``net.0.proj`` and ``net.2``."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0, inner_dim: int | None = None, bias: bool = True
    ) -> None:
        super().__init__()
        inner_dim = inner_dim or int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner_dim, bias=bias), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim, bias=bias)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, then a GEGLU feed-forward, each residual.

    ``only_cross_attention`` makes the first attention attend to the text as well (some SD variants).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        ff_inner_dim: int | None = None,
        ff_bias: bool = True,
    ) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention

        def attention(context_dim: int | None) -> Attention:
            return Attention(
                dim,
                context_dim,
                num_attention_heads,
                attention_head_dim,
                attention_bias,
                dropout=dropout,
                upcast_attention=upcast_attention,
            )

        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = attention(cross_attention_dim if only_cross_attention else None)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = attention(cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout, inner_dim=ff_inner_dim, bias=ff_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self_context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), self_context, attention_mask)
        hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states, encoder_attention_mask)
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer2DModel(nn.Module):
    """Transformer blocks applied to a feature map: GroupNorm, project in, blocks, project out, + input.

    ``use_linear_projection`` chooses Linear projections on tokens (SD2 / SDXL) over 1x1 convs on
    the map (SD1.x); the weights differ only in shape, so both must be reproduced exactly.
    """

    compile_region = True  # compiled on its own by the regional compile (gesso.optimize.compile)

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        attention_bias: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                cross_attention_dim=cross_attention_dim,
                dropout=dropout,
                attention_bias=attention_bias,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        tokens = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, hidden_states.shape[1])
        if self.use_linear_projection:
            tokens = self.proj_in(tokens)

        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states, attention_mask, encoder_attention_mask)

        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
        # Back in the input's memory order: a channels-last map stays channels-last (the tokens are
        # already in that order, so no copy), and what follows reads it without transposing.
        layout = torch.channels_last if residual.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        hidden_states = tokens.reshape(batch, height, width, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual
