"""Timestep embeddings and the embeddings that are added to them (SDXL's ``text_time``).

Nothing here is computed in ``__init__``: the sinusoidal frequencies are rebuilt in ``forward``,
so a model constructed on the meta device and then given weights needs no extra buffers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from gesso.nn.activations import get_activation


def standard_normal(*shape: int) -> torch.Tensor:
    """Random values, as ``torch.randn``, except on the meta device: there it returns an empty tensor.

    gesso's ``from_pretrained`` builds models on the meta device, where ``randn`` and ``normal_`` run through
    torch's reference implementations, whose first use imports ``torch._dynamo`` and sympy (about two
    seconds of a new process) to initialise nothing.
    """
    values = torch.empty(*shape)
    return values if values.is_meta else nn.init.normal_(values)


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``nn.Embedding`` initialised as torch does, by :func:`standard_normal`."""
    return nn.Embedding(num_embeddings, embedding_dim, _weight=standard_normal(num_embeddings, embedding_dim))


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal features of 1-d ``timesteps``: ``(N,) -> (N, dim)``, in float32.

    Frequencies fall geometrically from 1 to ``1/max_period``; ``freq_shift`` moves the
    denominator of the exponent (0 for SD, 1 for the DDPM-style convention), and
    ``flip_sin_to_cos`` puts the cosine half first, as the published UNets were trained.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-d, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    # Same operation order as the reference, so that large timesteps give bit-identical angles.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = scale * (timesteps[:, None].float() * frequencies[None, :])
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free module form of :func:`timestep_embedding`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float, scale: float = 1.0) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.freq_shift, self.scale)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP from sinusoidal features to the embedding every resnet block receives.

    ``cond_proj`` (no bias) lets a condition such as LCM's guidance embedding be added to the
    input features (``timestep_cond`` of the UNet).
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("a timestep condition was given but this embedding has no cond_proj (time_cond_proj_dim)")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


class TextTimeEmbedding(TimestepEmbedding):
    """SDXL's added embedding (``addition_embed_type="text_time"``).

    The pooled text embedding is concatenated with sinusoidal features of the six ``time_ids``
    (original size, crop offset, target size) and sent through an MLP; the UNet adds the result to
    the timestep embedding. It subclasses :class:`TimestepEmbedding` so that its weights keep the
    reference names ``add_embedding.linear_1`` / ``linear_2``. ``emb`` is not read (``per_image``:
    see :mod:`gesso.nn.unet_2d_condition`); the features take the weights' dtype, which is the
    timestep embedding's.
    """

    per_image = True

    def __init__(self, in_channels: int, time_embed_dim: int, time_ids_dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__(in_channels, time_embed_dim)
        self.time_ids_proj = Timesteps(time_ids_dim, flip_sin_to_cos, freq_shift)

    def forward(  # type: ignore[override]
        self, emb: torch.Tensor, encoder_hidden_states: torch.Tensor, added_cond_kwargs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        missing = [key for key in ("text_embeds", "time_ids") if key not in added_cond_kwargs]
        if missing:
            raise ValueError(f"addition_embed_type 'text_time' needs added_cond_kwargs {missing}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_features = self.time_ids_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        features = torch.cat([text_embeds, time_features], dim=-1).to(self.linear_1.weight.dtype)
        return super().forward(features)


class TextProjection(nn.Linear):
    """``encoder_hid_dim_type="text_proj"``: a linear map of the text states to ``cross_attention_dim``."""

    per_image = True

    def forward(self, encoder_hidden_states: torch.Tensor, added_cond_kwargs: Mapping[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(encoder_hidden_states)
