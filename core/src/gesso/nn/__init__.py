"""gesso's shared neural-network models: the SD-family UNet and KL autoencoder, and their parts.

Published checkpoints load unchanged: every module and parameter keeps the reference's name.
Plugins extend the UNet through the registries re-exported here.
"""

from gesso.nn.activations import get_activation
from gesso.nn.attention import GEGLU, Attention, BasicTransformerBlock, FeedForward, Transformer2DModel
from gesso.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLOutput, DecoderOutput
from gesso.nn.embeddings import TextProjection, TextTimeEmbedding, TimestepEmbedding, Timesteps, timestep_embedding
from gesso.nn.normalization import GroupNorm, OutputGroupNorm
from gesso.nn.resnet import Downsample2D, NormFactory, ResnetBlock2D, Upsample2D
from gesso.nn.unet_2d_condition import (
    ADDITION_EMBEDDINGS,
    ENCODER_HID_PROJECTIONS,
    UNet2DConditionModel,
    UNet2DConditionOutput,
    register_addition_embedding,
    register_encoder_hid_projection,
)
from gesso.nn.unet_blocks import (
    DOWN_BLOCKS,
    MID_BLOCKS,
    UP_BLOCKS,
    BlockSpec,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    UpDecoderBlock2D,
    build_block,
    register_block,
)
from gesso.nn.vae import Decoder, DiagonalGaussianDistribution, Encoder

__all__ = [
    "ADDITION_EMBEDDINGS",
    "DOWN_BLOCKS",
    "ENCODER_HID_PROJECTIONS",
    "GEGLU",
    "MID_BLOCKS",
    "UP_BLOCKS",
    "Attention",
    "AutoencoderKL",
    "AutoencoderKLOutput",
    "BasicTransformerBlock",
    "BlockSpec",
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "Decoder",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "DownBlock2D",
    "DownEncoderBlock2D",
    "Downsample2D",
    "Encoder",
    "FeedForward",
    "GroupNorm",
    "NormFactory",
    "OutputGroupNorm",
    "ResnetBlock2D",
    "TextProjection",
    "TextTimeEmbedding",
    "TimestepEmbedding",
    "Timesteps",
    "Transformer2DModel",
    "UNet2DConditionModel",
    "UNet2DConditionOutput",
    "UNetMidBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
    "UpDecoderBlock2D",
    "Upsample2D",
    "build_block",
    "get_activation",
    "register_addition_embedding",
    "register_block",
    "register_encoder_hid_projection",
    "timestep_embedding",
]
