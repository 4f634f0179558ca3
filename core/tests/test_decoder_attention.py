"""``decoder_attention_bf16x3``: a float32 decoder's attention from bfloat16 parts of its operands.

The products themselves run on CUDA tensor cores (tests/gpu times them and checks the decoded
image); here the products are computed exactly from the same bfloat16 parts, which tests the
algebra: the split, the chunking of queries, the softmax between them. And where the optimization
applies: the image decoder's attentions, in float32 only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gesso import AutoPipelineForText2Image
from gesso.nn.attention import Attention
from gesso.optimize import decoder_attention
from gesso.optimize.decoder_attention import (
    attention_in_bfloat16_parts,
    compiled_softmax_in_bfloat16_parts,
    decoder_attention_bf16x3,
    decoder_sdpa,
    softmax_in_bfloat16_parts,
    split_bfloat16,
)
from gesso.plugins import get_host


def exact_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What the tensor cores compute from bfloat16 operands: their exact products, summed in float32 or better."""
    return (a.double() @ b.double()).float()


def qkv(batch: int = 1, heads: int = 1, tokens: int = 300, width: int = 64, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, width, generator=generator) * 2 for _ in range(3)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_two_bfloat16_parts_keep_sixteen_significant_bits():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 100
    high, low = split_bfloat16(x)
    assert high.dtype == low.dtype == torch.bfloat16
    assert ((high.double() + low.double() - x.double()).abs() / x.double().abs()).max() < 2**-16
    assert ((high.double() - x.double()).abs() / x.double().abs()).max() > 2**-10  # the high part alone does not


def test_the_compiled_softmax_keeps_the_low_parts_that_inductor_would_fold_away():
    scores = torch.randn(16, 300, generator=torch.Generator().manual_seed(4)) * 4
    high, low = compiled_softmax_in_bfloat16_parts()(scores)  # Inductor's C++ code here, Triton's on a GPU
    exact = scores.double().softmax(dim=-1)
    assert high.dtype == low.dtype == torch.bfloat16 and bool(low.any())
    error = relative_error(high.double() + low.double(), exact)
    eager_high, eager_low = softmax_in_bfloat16_parts(scores)
    assert error < 2 * relative_error(eager_high.double() + eager_low.double(), exact)  # as close as the eager parts
    assert error < relative_error(high, exact) / 100  # and far closer than the high part alone


def test_without_triton_the_softmax_and_its_split_stay_eager(monkeypatch):
    monkeypatch.setattr(decoder_attention.importlib.util, "find_spec", lambda name: None)
    decoder_attention.softmax_parts_on_cuda.cache_clear()
    try:
        assert decoder_attention.softmax_parts_on_cuda() is softmax_in_bfloat16_parts
    finally:
        decoder_attention.softmax_parts_on_cuda.cache_clear()


def test_attention_from_parts_is_float32_attention_to_sixteen_bits():
    query, key, value = qkv(tokens=300, width=64)
    exact = F.scaled_dot_product_attention(query.double(), key.double(), value.double())
    ours = attention_in_bfloat16_parts(query, key, value, product=exact_product)
    in_bfloat16 = F.scaled_dot_product_attention(*(x.bfloat16().double() for x in (query, key, value)))
    assert ours.dtype == torch.float32 and ours.shape == query.shape
    assert relative_error(ours, exact) < 1e-4
    assert relative_error(ours, exact) < relative_error(in_bfloat16, exact) / 30  # the low parts are used


def test_queries_in_chunks_and_several_heads_give_the_attention_of_all_at_once(monkeypatch):
    query, key, value = qkv(batch=2, heads=3, tokens=50, width=16, seed=2)
    whole = attention_in_bfloat16_parts(query, key, value, product=exact_product)
    monkeypatch.setattr(decoder_attention, "SCORES_BYTES", 4 * 50 * 7)  # 7 queries a chunk: 8 chunks, the last short
    chunked = attention_in_bfloat16_parts(query, key, value, product=exact_product)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    for b in range(2):
        for h in range(3):  # each head attends over its own keys
            alone = attention_in_bfloat16_parts(query[b, h][None, None], key[b, h][None, None], value[b, h][None, None], exact_product)
            torch.testing.assert_close(chunked[b, h], alone[0, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_off_a_cuda_device_or_with_a_mask_sdpa_runs_as_it_is(dtype):
    query, key, value = (x.to(dtype) for x in qkv(tokens=20, width=8))
    assert torch.equal(decoder_sdpa(query, key, value), F.scaled_dot_product_attention(query, key, value))
    mask = torch.zeros(1, 1, 20, 20, dtype=dtype)
    assert torch.equal(decoder_sdpa(query, key, value, attn_mask=mask), F.scaled_dot_product_attention(query, key, value, attn_mask=mask))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from gesso_sdxl.tiny import write_tiny_checkpoint

    return AutoPipelineForText2Image.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("decoder-attention") / "sdxl"))


def test_only_the_image_decoders_attentions_get_it(sdxl):
    policy = get_host().registry.families["sdxl"].execution_policy
    decoder_attention_bf16x3(sdxl, policy)
    given = [m for m in sdxl.vae.decoder.modules() if isinstance(m, Attention)]
    assert given and all(m.sdpa is decoder_sdpa for m in given)
    others = [m for part in (sdxl.vae.encoder, sdxl.unet) for m in part.modules() if isinstance(m, Attention)]
    assert others and all(m.sdpa is None for m in others)
    assert "sdpa" not in "".join(sdxl.vae.state_dict())


def test_it_is_in_fast_on_cuda_and_refused_by_name_on_the_cpu(sdxl):
    from gesso.config import ConfigError, presets
    from gesso.runner import optimize

    registry = get_host().registry
    assert "decoder_attention_bf16x3" in presets(registry)["fast"]
    assert registry.optimizations["decoder_attention_bf16x3"].supports("sdxl", "cuda") is None
    with pytest.raises(ConfigError, match="decoder_attention_bf16x3"):
        optimize(sdxl, ["decoder_attention_bf16x3"])
