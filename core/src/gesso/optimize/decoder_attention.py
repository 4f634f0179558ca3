"""``decoder_attention_bf16x3``: a float32 image decoder's attention as bfloat16 tensor-core products.

SDXL decodes in float32 (its published VAE overflows float16). Both libraries then run the
decoder's convolutions on TF32 tensor cores (cuDNN's default), but its one attention, over every
pixel of the 128x128 latent map at width 512, goes to SDPA's memory-efficient kernel in IEEE float32
on the CUDA cores: about 14 ms of a 55 ms decode on an H200 (``benchmarks/NOTES.md``). TF32 matrix
products through cuBLAS would need the process-wide matmul flag, which a library cannot set and
restore safely (PyTorch refuses to read it once its two APIs were mixed).

Instead each float32 operand ``x`` is split into two bfloat16 parts, ``high = bf16(x)`` and
``low = bf16(x - high)``, and ``a @ b`` becomes ``ah @ bh + ah @ bl + al @ bh`` (the ``al @ bl`` term
is below float32's own rounding of the sum), accumulated in float32 by the tensor cores. bfloat16
keeps float32's exponent range, which is why the decoder is float32 at all; the two parts carry
16 of float32's 24 mantissa bits, so the attention's output is about ten times closer to IEEE
float32 than TF32's products would be (relative 2.6e-5 against 4.4e-4), and far closer than the TF32
convolutions around it. The softmax stays in float32, over chunks of queries whose scores take a
bounded amount of scratch memory. On an H200 the attention of SDXL's 1024x1024 decode takes 6.0 ms
instead of SDPA's 14.1 ms (``benchmarks/probes/decode_attention.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("gesso")

#: One chunk's float32 scores: the queries per chunk follow from it. The chunk's scratch peaks at about
#: three times this (scores, their softmax, then the weights' parts and the float32 difference).
SCORES_BYTES = 128 * 2**20

#: ``(a, b) -> a @ b`` in float32 from bfloat16 operands.
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tensor_core_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 matrices, accumulated and returned in float32 (cuBLAS, no rounding to bfloat16)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def split_bfloat16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float32) as ``high + low`` in bfloat16, to 16 significant bits."""
    high = x.to(torch.bfloat16)
    return high, (x - high).to(torch.bfloat16)  # promoted to float32, exactly


def attention_in_bfloat16_parts(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, product: Product = tensor_core_product
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for float32 ``(..., tokens, d)`` tensors, each product in three bfloat16 parts."""
    out = torch.empty_like(query)
    scale = query.shape[-1] ** -0.5
    rows = max(1, SCORES_BYTES // (4 * key.shape[-2]))
    for q, k, v, o in zip(query.flatten(0, -3), key.flatten(0, -3), value.flatten(0, -3), out.flatten(0, -3)):
        k_high, k_low = split_bfloat16(k)
        keys = torch.cat([k_high, k_low, k_high], dim=1).t()  # against [q_high, q_high, q_low]: three products in one
        v_high, v_low = split_bfloat16(v)
        values = torch.cat([v_high, v_low], dim=1)
        width = v.shape[-1]
        for start in range(0, q.shape[0], rows):
            q_high, q_low = split_bfloat16(q[start : start + rows] * scale)
            weights = product(torch.cat([q_high, q_high, q_low], dim=1), keys).softmax(dim=-1)
            w_high, w_low = split_bfloat16(weights)
            both = product(w_high, values)
            o[start : start + rows] = both[:, :width] + both[:, width:] + product(w_low, v_high)
    return out


def decoder_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA's call, run in bfloat16 parts where it would run in IEEE float32 on a CUDA device."""
    if query.dtype == torch.float32 and query.is_cuda and attn_mask is None:
        return attention_in_bfloat16_parts(query, key, value)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


def decoder_attention_bf16x3(pipeline: Any, policy: Any) -> None:
    """Give the image decoder's attentions :func:`decoder_sdpa`; they use it when they run in float32."""
    from gesso.nn.attention import Attention

    if "dtype" not in torch.ops.aten.mm.overloads():
        logger.info("decoder_attention_bf16x3: this torch's matrix product has no float32 output for bfloat16 inputs; nothing changed")
        return
    vae = getattr(pipeline, policy.image_decoder, None)
    decoder = getattr(vae, "decoder", None)
    if isinstance(decoder, torch.nn.Module):
        for module in decoder.modules():
            if isinstance(module, Attention):
                module.sdpa = decoder_sdpa
