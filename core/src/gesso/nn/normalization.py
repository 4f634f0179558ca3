"""GroupNorm whose statistics compile into a well-spread reduction.

A UNet's GroupNorm has 32 groups: at batch 2, 64 statistics, each a reduction over a whole group
(SD1.5's 16x16 level: 40 channels x 256 pixels). On many shapes Inductor gives each statistic one
program, so the norm runs on 64 of the GPU's 132 multiprocessors and takes 5-15x longer than reading
the tensor once (``benchmarks/NOTES.md``). Under ``torch.compile`` this module computes each group's mean and
variance over a few equal pixel chunks first and combines them exactly (the mean of the chunks'
means; the mean of their variances plus the variance of their means), so the first reduction has
several programs per group. Eager calls keep the library kernel (``F.group_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

#: A norm of at most this many statistics (one image: 32 groups) whose statistics each cover at
#: least ``LARGE_STATISTIC`` elements is reduced in ``LARGE_MAP_CHUNKS`` chunks: a VAE decoder's maps.
ONE_IMAGE_STATISTICS = 32
LARGE_STATISTIC = 2**18
LARGE_MAP_CHUNKS = 16


def pixel_chunks(pixels: int, statistics: int, channels_per_group: int) -> int:
    """How many chunks to split each group's pixels into under ``torch.compile``; 1 leaves the norm
    to Inductor's own lowering. ``statistics`` is batch x groups.

    Measured on an H200 per shape (``benchmarks/NOTES.md``, GroupNorm + SiLU compiled alone): at a
    UNet's batch of 2, Inductor spreads the statistics of maps of 64x64 pixels and more whose pixel
    count is a power of two well by itself, and the chunked form is slower there; every other map
    (SD1.5's 32x32 and below, every level of Kandinsky's 96x96 UNet) is faster chunked. 4 chunks give
    256 programs at batch 2; 8 keep each program's loop short on maps of 48x48 and more. One image's
    large maps (a VAE decoder's 128x128 to 1024x1024, 32 statistics of 2^18 to 2^22 elements) are 1.2
    to 3.7 times faster in 16 chunks. The count is reduced to a divisor of ``pixels``.
    """
    if statistics <= ONE_IMAGE_STATISTICS and channels_per_group * pixels >= LARGE_STATISTIC:
        return _dividing(pixels, LARGE_MAP_CHUNKS)
    if pixels >= 64 * 64 and pixels & (pixels - 1) == 0:
        return 1
    return _dividing(pixels, 8 if pixels >= 48 * 48 else 4)


def _dividing(pixels: int, chunks: int) -> int:
    """The largest power of two up to ``chunks`` (one itself) that divides ``pixels``: plain integer
    arithmetic, which a compile with dynamic shapes can trace (``math.gcd`` of a symbolic size cannot)."""
    while pixels % chunks:
        chunks //= 2
    return chunks


def group_norm_in_chunks(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, chunks: int
) -> torch.Tensor:
    """``F.group_norm`` of an ``(N, C, H, W)`` map with the statistics reduced over ``chunks`` pixel
    chunks per group first, in float32 (float64 stays float64); reads the map in its own memory
    order (NCHW or NHWC) and returns it in that order."""
    batch, channels, height, width = x.shape
    pixels, per_group = height * width, channels // groups
    compute = torch.promote_types(x.dtype, torch.float32)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        pixels_first = x.permute(0, 2, 3, 1)  # (N, H, W, C) in memory order
        parts = pixels_first.reshape(batch, chunks, pixels // chunks, groups, per_group).to(compute)
        var, mean = torch.var_mean(parts, dim=(2, 4), correction=0)  # (N, chunks, G)
        chunk_dim, stats_shape = 1, (batch, 1, groups, 1)
        grouped = pixels_first.reshape(batch, pixels, groups, per_group)
    else:
        parts = x.reshape(batch, groups, per_group, chunks, pixels // chunks).to(compute)
        var, mean = torch.var_mean(parts, dim=(2, 4), correction=0)  # (N, G, chunks)
        chunk_dim, stats_shape = 2, (batch, groups, 1, 1)
        grouped = x.reshape(batch, groups, per_group, pixels)
    group_mean = mean.mean(chunk_dim, keepdim=True)
    group_var = var.mean(chunk_dim, keepdim=True) + (mean - group_mean).square().mean(chunk_dim, keepdim=True)
    rstd = torch.rsqrt(group_var + eps).reshape(stats_shape)
    normalized = (grouped.to(compute) - group_mean.reshape(stats_shape)) * rstd
    if channels_last:
        normalized = normalized.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    else:
        normalized = normalized.reshape(batch, channels, height, width)
    if weight is not None:
        normalized = normalized * weight.to(compute).view(1, channels, 1, 1)
    if bias is not None:
        normalized = normalized + bias.to(compute).view(1, channels, 1, 1)
    return normalized.to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) whose compiled form spreads its
    statistics over the GPU; see the module's docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and torch.compiler.is_compiling():  # eager calls pay for nothing here
            chunks = pixel_chunks(x.shape[2] * x.shape[3], x.shape[0] * self.num_groups, self.num_channels // self.num_groups)
            if chunks > 1:
                return group_norm_in_chunks(x, self.num_groups, self.weight, self.bias, self.eps, chunks)
        return super().forward(x)


class OutputGroupNorm(GroupNorm):
    """The GroupNorm in front of a network's output convolution (a UNet's or a VAE decoder's
    ``conv_norm_out``), compiled as a region of its own by the regional compile: it stands outside
    every block, and PyTorch's eager kernel reads a channels-last map through copies to and from
    NCHW (0.3 ms of SDXL's 30 ms UNet step on an H200, ``benchmarks/NOTES.md``). Its output keeps
    the input's memory order, which the output convolution then reads without another copy."""

    compile_region = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = super().forward(x)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return normalized.contiguous(memory_format=torch.channels_last)
        return normalized
