"""Decoded tensors to PIL images: rounding where the tensor is gives numpy's pixels exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gesso.images import numpy_to_pil, postprocess, tensor_to_pil, to_numpy


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("channels", [3, 1])
def test_tensor_to_pil_gives_the_pixels_of_the_numpy_conversion(dtype, channels):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, channels, 17, 23, generator=generator).to(dtype)
    # values whose scaled form sits on a rounding tie (k + 0.5) / 255, where half-to-even matters
    images[0, 0, 0, :10] = ((torch.arange(10) + 0.5) / 255).to(dtype)
    images[0, 0, 1, :2] = torch.tensor([0.0, 1.0], dtype=dtype)
    ours = [np.asarray(image) for image in tensor_to_pil(images)]
    numpys = [np.asarray(image) for image in numpy_to_pil(to_numpy(images))]
    assert [image.shape for image in ours] == [image.shape for image in numpys]
    for mine, theirs in zip(ours, numpys):
        np.testing.assert_array_equal(mine, theirs)


def test_postprocess_pil_denormalizes_first():
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    pil = postprocess(images, "pil")
    expected = numpy_to_pil(postprocess(images, "np"))
    assert len(pil) == 2
    for mine, theirs in zip(pil, expected):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
