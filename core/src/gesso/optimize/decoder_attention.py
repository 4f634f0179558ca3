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
convolutions around it. The softmax is taken in float32, over chunks of queries whose scores take a
bounded amount of scratch memory, and split into the weights' parts in the same compiled kernel. On
an H200 the attention of SDXL's 1024x1024 decode takes 3.9-4.1 ms instead of SDPA's 14.2 ms
(``benchmarks/probes/decode_attention.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("gesso")

#: One chunk's float32 scores: the queries per chunk follow from it. A chunk's scratch peaks at about
#: twice this (the scores and the weights' two bfloat16 parts).
SCORES_BYTES = 128 * 2**20

#: ``(a, b) -> a @ b`` in float32 from bfloat16 operands.
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: ``scores -> (high, low)``: the softmax of float32 scores as two bfloat16 parts.
SoftmaxParts = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def tensor_core_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 matrices, accumulated and returned in float32 (cuBLAS, no rounding to bfloat16)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def split_bfloat16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float32) as ``high + low`` in bfloat16, to 16 significant bits."""
    high = x.to(torch.bfloat16)
    return high, (x - high).to(torch.bfloat16)  # promoted to float32, exactly


def softmax_in_bfloat16_parts(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over the last dimension of float32 ``scores``, as :func:`split_bfloat16`'s two parts."""
    return split_bfloat16(scores.softmax(dim=-1))


def compiled_softmax_in_bfloat16_parts() -> SoftmaxParts:
    """:func:`softmax_in_bfloat16_parts` compiled to one kernel: it reads the scores once and writes the
    two parts, where the eager calls also write and read the float32 weights and their difference (on
    an H200: SDXL's decoder attention 5.8 -> 3.9-4.1 ms, its scratch 696 -> 440 MiB).

    Inductor folds ``bf16(x)`` promoted back to float32 into ``x`` unless told to round as written
    (``emulate_precision_casts``); folded, every low part would be zero and the result bfloat16's.
    Compiled on first use, and again for each new chunk shape (a new image size)."""
    return torch.compile(softmax_in_bfloat16_parts, dynamic=False, options={"emulate_precision_casts": True})


@functools.cache
def softmax_parts_on_cuda() -> SoftmaxParts:
    """The softmax parts a CUDA device runs: compiled, or the eager calls where Inductor has no Triton to
    generate GPU code with."""
    if importlib.util.find_spec("triton") is None:
        logger.info("decoder_attention_bf16x3: Triton is not installed; the softmax and its split run as separate calls")
        return softmax_in_bfloat16_parts
    return compiled_softmax_in_bfloat16_parts()


def attention_in_bfloat16_parts(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    product: Product = tensor_core_product,
    softmax_parts: SoftmaxParts = softmax_in_bfloat16_parts,
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
        for start in range(0, q.shape[0], rows):
            o[start : start + rows] = _attend(q[start : start + rows] * scale, keys, values, v_high, product, softmax_parts)
    return out


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, v_high: torch.Tensor, product: Product, softmax_parts: SoftmaxParts
) -> torch.Tensor:
    """One chunk of queries (scaled) against the keys' and values' parts; its scratch is freed on return."""
    q_high, q_low = split_bfloat16(q)
    w_high, w_low = softmax_parts(product(torch.cat([q_high, q_high, q_low], dim=1), keys))
    both = product(w_high, values)
    width = v_high.shape[-1]
    return both[:, :width] + both[:, width:] + product(w_low, v_high)


def decoder_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA's call, run in bfloat16 parts where it would run in IEEE float32 on a CUDA device.

    Not while a caller of the decoder traces it with ``torch.compile``: Inductor would fold the low parts
    away (see :func:`compiled_softmax_in_bfloat16_parts`), so a traced call stays SDPA's."""
    if query.dtype == torch.float32 and query.is_cuda and attn_mask is None and not torch.compiler.is_compiling():
        return attention_in_bfloat16_parts(query, key, value, softmax_parts=softmax_parts_on_cuda())
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
