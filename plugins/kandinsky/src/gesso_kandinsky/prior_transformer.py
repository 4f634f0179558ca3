"""The unCLIP prior (``PriorTransformer``): predicts a CLIP image embedding from CLIP text features.

The input sequence is ``[text tokens ; text embedding ; time embedding ; noisy image embedding ;
learned "prd" query]``, each projected to the model width and given a learned position; a stack
of pre-norm self-attention / GELU MLP blocks runs over it, and the output at the last position
(``prd``) is projected back to the CLIP embedding size. With a text mask, padded text tokens are
hidden and attention is causal; ``post_process_latents`` undoes the CLIP-space normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gesso.configuration import register_to_config
from gesso.modeling import ModelMixin
from gesso.nn import Attention, TimestepEmbedding, Timesteps
from torch import nn


@dataclass
class PriorTransformerOutput:
    predicted_image_embedding: torch.Tensor


class GELUProjection(nn.Module):
    """Linear then exact GELU (the first layer of the prior's MLP, weights at ``net.0.proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states))


class PriorFeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class PriorBlock(nn.Module):
    """Pre-norm self-attention (biased projections) and MLP, each residual. Named ``norm1/attn1/norm3/ff``."""

    compile_region = True  # compiled on its own by the regional compile (gesso.optimize.compile)

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=True, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = PriorFeedForward(dim, dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask=attention_mask)
        return hidden_states + self.ff(self.norm3(hidden_states))


class PriorTransformer(ModelMixin):
    """The prior of Kandinsky 2.x / unCLIP, built from the reference ``config.json``."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 32,
        attention_head_dim: int = 64,
        num_layers: int = 20,
        embedding_dim: int = 768,
        num_embeddings: int = 77,
        additional_embeddings: int = 4,
        dropout: float = 0.0,
        time_embed_act_fn: str = "silu",
        norm_in_type: str | None = None,
        embedding_proj_norm_type: str | None = None,
        encoder_hid_proj_type: str | None = "linear",
        added_emb_type: str | None = "prd",
        time_embed_dim: int | None = None,
        embedding_proj_dim: int | None = None,
        clip_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        embedding_proj_dim = embedding_proj_dim or embedding_dim
        clip_embed_dim = clip_embed_dim or embedding_dim
        for key, value, known in (
            ("norm_in_type", norm_in_type, (None, "layer")),
            ("embedding_proj_norm_type", embedding_proj_norm_type, (None, "layer")),
            ("encoder_hid_proj_type", encoder_hid_proj_type, (None, "linear")),
            ("added_emb_type", added_emb_type, (None, "prd")),
        ):
            if value not in known:
                raise ValueError(f"{key}: unsupported {value!r}; known: {list(known)}")
        self.additional_embeddings = additional_embeddings
        self.time_proj = Timesteps(inner, True, 0)
        self.time_embedding = TimestepEmbedding(inner, time_embed_dim or inner, act_fn=time_embed_act_fn, out_dim=inner)
        self.proj_in = nn.Linear(embedding_dim, inner)
        self.embedding_proj_norm = nn.LayerNorm(embedding_proj_dim) if embedding_proj_norm_type == "layer" else None
        self.embedding_proj = nn.Linear(embedding_proj_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(embedding_dim, inner) if encoder_hid_proj_type == "linear" else None
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_embeddings + additional_embeddings, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner)) if added_emb_type == "prd" else None
        self.transformer_blocks = nn.ModuleList(
            PriorBlock(inner, num_attention_heads, attention_head_dim, dropout) for _ in range(num_layers)
        )
        self.norm_in = nn.LayerNorm(inner) if norm_in_type == "layer" else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_embed_dim)
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_embed_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_embed_dim))

    def _timesteps(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(device)
        return timestep * torch.ones(batch, dtype=timestep.dtype, device=timestep.device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorTransformerOutput | tuple[torch.Tensor]:
        """``hidden_states``: noisy image embeddings ``(B, D)``; ``proj_embedding``: text embeddings
        ``(B, D)``; ``encoder_hidden_states``: text tokens ``(B, N, D)``; ``attention_mask``: keep-mask ``(B, N)``."""
        batch = hidden_states.shape[0]
        dtype = self.proj_in.weight.dtype
        time_features = self.time_proj(self._timesteps(timestep, batch, hidden_states.device)).to(dtype)
        time_embeddings = self.time_embedding(time_features)
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        proj_embeddings = self.embedding_proj(proj_embedding)
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hid_proj_type='linear' needs encoder_hidden_states (the text tokens)")
            encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)
        hidden_states = self.proj_in(hidden_states)

        parts = []
        prefix = 0
        if encoder_hidden_states is not None:
            parts.append(encoder_hidden_states)
            prefix += encoder_hidden_states.shape[1]
        if proj_embeddings.ndim == 2:
            proj_embeddings = proj_embeddings[:, None, :]
        if hidden_states.ndim == 2:
            hidden_states = hidden_states[:, None, :]
        parts += [proj_embeddings, time_embeddings[:, None, :], hidden_states]
        if self.prd_embedding is not None:
            parts.append(self.prd_embedding.to(hidden_states.dtype).expand(batch, -1, -1))
        sequence = torch.cat(parts, dim=1)
        prefix += proj_embeddings.shape[1] + 1

        positions = self.positional_embedding.to(sequence.dtype)
        if positions.shape[1] < sequence.shape[1]:  # no text tokens: positions start after them
            positions = F.pad(positions, (0, 0, prefix, 1 if self.prd_embedding is not None else 0), value=0.0)
        sequence = sequence + positions

        bias = None
        if attention_mask is not None:
            length = sequence.shape[1]
            text_bias = (1 - attention_mask.to(sequence.dtype)) * -10000.0
            text_bias = F.pad(text_bias, (0, self.additional_embeddings), value=0.0)
            causal = torch.full((length, length), -10000.0, device=sequence.device).triu_(1)
            bias = (text_bias[:, None, :] + causal[None]).to(sequence.dtype)

        if self.norm_in is not None:
            sequence = self.norm_in(sequence)
        for block in self.transformer_blocks:
            sequence = block(sequence, attention_mask=bias)
        sequence = self.norm_out(sequence)
        sequence = sequence[:, -1] if self.prd_embedding is not None else sequence[:, prefix:]
        predicted = self.proj_to_clip_embeddings(sequence)
        return PriorTransformerOutput(predicted_image_embedding=predicted) if return_dict else (predicted,)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP space -> CLIP image embeddings."""
        device = prior_latents.device
        return prior_latents * self.clip_std.to(device) + self.clip_mean.to(device)
