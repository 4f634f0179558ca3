"""VAE slicing: the decoder's activations for a batch of N images take N times the memory of one;
decoding one latent at a time bounds the peak by a single image's, for the same pixels."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def vae_slicing(pipeline: Any, policy: Any) -> None:
    """Wrap ``pipeline.vae.decode`` so that a batch is decoded image by image (idempotent)."""
    vae = getattr(pipeline, "vae", None)
    if not isinstance(vae, torch.nn.Module) or not hasattr(vae, "decode"):
        raise ValueError("optimization 'vae_slicing' needs a pipeline with a VAE")
    if getattr(vae, "_sliced_decode", False):
        return
    whole = vae.decode

    def decode(z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        if z.shape[0] <= 1:
            return whole(z, return_dict=return_dict, **kwargs)
        outputs = [whole(z[i : i + 1], return_dict=True, **kwargs) for i in range(z.shape[0])]
        sample = torch.cat([o.sample for o in outputs])
        return dataclasses.replace(outputs[0], sample=sample) if return_dict else (sample,)

    vae.decode = decode
    vae._sliced_decode = True
