"""A transformer over a feature map returns it in the memory order it was given: channels-last stays
channels-last (what follows then reads it without transposing), and the values do not change."""

from __future__ import annotations

import pytest
import torch
from gesso.nn import Transformer2DModel


@pytest.mark.parametrize("linear_projection", [False, True])
def test_transformer_keeps_the_input_memory_order(linear_projection):
    torch.manual_seed(0)
    block = Transformer2DModel(2, 8, 32, cross_attention_dim=16, norm_num_groups=8, use_linear_projection=linear_projection).eval()
    x = torch.randn(2, 32, 6, 5)
    context = torch.randn(2, 7, 16)

    with torch.no_grad():
        plain = block(x, context)
        nhwc = block(x.contiguous(memory_format=torch.channels_last), context)

    assert plain.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    torch.testing.assert_close(nhwc, plain, rtol=1e-5, atol=1e-5)


def test_output_norm_keeps_the_input_memory_order_and_the_library_values():
    from gesso.nn import OutputGroupNorm

    torch.manual_seed(0)
    norm = OutputGroupNorm(4, 16, eps=1e-6)
    x = torch.randn(2, 16, 6, 5)
    expected = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6)

    nhwc = norm(x.contiguous(memory_format=torch.channels_last))
    plain = norm(x)

    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert plain.is_contiguous()
    torch.testing.assert_close(nhwc, expected)
    torch.testing.assert_close(plain, expected)
