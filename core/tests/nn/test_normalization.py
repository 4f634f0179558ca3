"""GroupNorm with chunked statistics: the same result as the library's in either memory order, used
only under torch.compile and only where chunking was measured to pay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gesso.nn import normalization
from gesso.nn.normalization import GroupNorm, group_norm_in_chunks, pixel_chunks
from torch import nn


def feature_map(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1.5  # a far-from-zero mean
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "chunks"), [((2, 64, 8, 8), 4), ((1, 96, 6, 10), 4), ((3, 32, 12, 12), 8), ((2, 64, 4, 4), 16)])
def test_chunked_statistics_give_the_library_group_norm(shape, chunks, channels_last):
    x = feature_map(shape, torch.float64, channels_last)
    weight, bias = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)

    out = group_norm_in_chunks(x, 32, weight, bias, 1e-5, chunks)

    torch.testing.assert_close(out, F.group_norm(x, 32, weight, bias, 1e-5), rtol=1e-12, atol=1e-12)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)


def test_half_precision_maps_are_normalised_in_float32():
    x = feature_map((2, 64, 8, 8), torch.float16, channels_last=True)

    out = group_norm_in_chunks(x, 32, None, None, 1e-5, 4)

    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 32, eps=1e-5), rtol=0, atol=2e-3)


def test_chunk_counts_divide_the_map_and_leave_large_power_of_two_maps_to_inductor():
    unet_batch = 2 * 32  # statistics of a UNet step with guidance
    for side in (64, 128, 256):
        assert pixel_chunks(side * side, unet_batch, 10) == 1
    for height, width in ((8, 8), (16, 16), (32, 32), (12, 12), (24, 24), (48, 48), (96, 96), (7, 9), (50, 70)):
        chunks = pixel_chunks(height * width, unet_batch, 10)
        assert (height * width) % chunks == 0
    assert pixel_chunks(32 * 32, unet_batch, 10) > 1 and pixel_chunks(96 * 96, unet_batch, 10) > pixel_chunks(24 * 24, unet_batch, 10) > 1


def test_one_images_large_maps_are_chunked_where_its_small_ones_are_not():
    one_image = 32
    assert pixel_chunks(64 * 64, one_image, 16) == 1  # a VAE decoder's 64x64 map of 512 channels
    for side, channels_per_group in ((128, 16), (256, 8), (512, 4), (1024, 4)):
        assert pixel_chunks(side * side, one_image, channels_per_group) == normalization.LARGE_MAP_CHUNKS
    assert pixel_chunks(90 * 90, one_image, 64) == 4  # reduced to a divisor of the pixel count
    assert pixel_chunks(128 * 128, 2 * one_image, 16) == 1  # two images: Inductor's own split


@pytest.fixture
def chunked_calls(monkeypatch):
    calls = []
    original = normalization.group_norm_in_chunks

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(normalization, "group_norm_in_chunks", counting)
    return calls


def test_compiled_group_norm_takes_the_chunked_path_and_matches_eager(chunked_calls):
    norm = GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = feature_map((2, 64, 16, 16), torch.float32, channels_last=True)

    eager = norm(x)
    assert chunked_calls == []  # eager calls keep the library kernel
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)(x)

    assert chunked_calls == [x.shape]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_group_norm_leaves_other_inputs_to_the_library(chunked_calls):
    norm = GroupNorm(8, 16)
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    tokens = torch.randn(2, 16, 10)  # (B, C, L): the attention's norm over tokens
    large = torch.randn(1, 16, 64, 64)

    torch.testing.assert_close(compiled(tokens), norm(tokens))
    torch.testing.assert_close(compiled(large), norm(large))
    assert chunked_calls == []


def test_state_dict_is_the_library_modules():
    library = nn.GroupNorm(32, 64)
    ours = GroupNorm(32, 64)
    ours.load_state_dict(library.state_dict())
    assert list(ours.state_dict()) == list(library.state_dict())


def test_a_compiled_norm_of_one_large_image_splits_each_statistic_in_sixteen(monkeypatch):
    """A VAE decoder's norm at batch 1: 32 statistics of 4 x 256 x 256 elements each."""
    chunk_counts = []
    original = normalization.group_norm_in_chunks

    def recording(*args, **kwargs):
        chunk_counts.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(normalization, "group_norm_in_chunks", recording)
    norm = GroupNorm(32, 128, eps=1e-6)
    x = feature_map((1, 128, 256, 256), torch.float32, channels_last=True)

    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True, dynamic=False)(x)

    assert chunk_counts == [normalization.LARGE_MAP_CHUNKS]
    torch.testing.assert_close(compiled, norm(x), rtol=1e-4, atol=1e-4)


def test_a_norm_compiled_with_dynamic_shapes_traces_its_chunk_count(chunked_calls):
    """Chunk counts come from integer arithmetic that symbolic sizes support (``math.gcd`` does not)."""
    norm = GroupNorm(8, 16)
    x = feature_map((2, 16, 12, 12), torch.float32, channels_last=False)

    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True, dynamic=True)(x)

    assert chunked_calls == [x.shape]
    torch.testing.assert_close(compiled, norm(x), rtol=1e-5, atol=1e-5)
