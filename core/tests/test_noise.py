"""Noise must come out of a seeded generator exactly as ``torch.randn`` gives it (the reference draws
with ``torch.randn``), however it is drawn and wherever it is sent."""

from __future__ import annotations

import pytest
import torch
from gesso.noise import randn_tensor


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_generator_gives_the_values_of_torch_randn(dtype):
    shape = (2, 4, 9, 7)  # not a multiple of 16 values: the vectorized sampler's tail is drawn too
    expected = torch.randn(shape, generator=generator(3), dtype=dtype)
    assert torch.equal(randn_tensor(shape, generator(3), "cpu", dtype), expected)


def test_draws_continue_the_generators_stream():
    g, reference = generator(5), generator(5)
    drawn = [randn_tensor((1, 1280), g, "cpu") for _ in range(3)]
    assert all(torch.equal(d, torch.randn((1, 1280), generator=reference)) for d in drawn)


def test_a_list_of_generators_draws_one_batch_element_from_each():
    shape = (3, 4, 8, 8)
    expected = torch.cat([torch.randn((1, *shape[1:]), generator=generator(seed)) for seed in (7, 8, 9)])
    assert torch.equal(randn_tensor(shape, [generator(s) for s in (7, 8, 9)], "cpu"), expected)


def test_a_list_of_one_generator_is_that_generator():
    assert torch.equal(randn_tensor((2, 3), [generator(1)], "cpu"), torch.randn((2, 3), generator=generator(1)))


def test_a_generator_per_batch_element_is_required():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_tensor((3, 4), [generator(0), generator(1)], "cpu")
