"""Tiled decoding: decode a large latent in overlapping tiles and cross-fade the seams.

Memory for the decoder's activations then depends on the tile size, not the image size, which
is what makes 2048² and larger images decodable on small GPUs (and on the CPU). The tiling
(tiles of the VAE's training size, a quarter overlap, linear cross-fades above and to the left)
is the reference's, so a tiled decode gives the reference's tiled image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _fade(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first ``extent`` rows (dim 2) or columns (dim 3) of ``tile`` from ``before``'s last ones."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    ramp = torch.arange(extent, device=tile.device, dtype=tile.dtype) / extent
    ramp = ramp.view(-1, 1) if dim == 2 else ramp.view(1, -1)
    head = before.narrow(dim, before.shape[dim] - extent, extent) * (1 - ramp) + tile.narrow(dim, 0, extent) * ramp
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def tiled_decode(
    decode_tile: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, latent_tile: int, sample_tile: int, overlap: float = 0.25
) -> torch.Tensor:
    """Decode ``z`` tile by tile with ``decode_tile`` (latent tile -> image tile)."""
    stride = int(latent_tile * (1 - overlap))
    blend = int(sample_tile * overlap)
    keep = sample_tile - blend
    rows = [
        [decode_tile(z[:, :, i : i + latent_tile, j : j + latent_tile]) for j in range(0, z.shape[3], stride)]
        for i in range(0, z.shape[2], stride)
    ]
    out_rows = []
    for i, row in enumerate(rows):
        pieces = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _fade(rows[i - 1][j], tile, blend, dim=2)
            if j > 0:
                tile = _fade(row[j - 1], tile, blend, dim=3)
            row[j] = tile
            pieces.append(tile[:, :, :keep, :keep])
        out_rows.append(torch.cat(pieces, dim=3))
    return torch.cat(out_rows, dim=2)
