"""Offload's CPU copies of the weights: packed with their layouts, lent to a device, taken back
without a copy unless the device changed them."""

from __future__ import annotations

import pytest
import torch
from gesso.optimize import offload
from gesso.optimize.offload import HostWeights
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
        self.embed = nn.Embedding(300, 16)  # 19 KB: larger than the test's 16 KB blocks
        self.head = nn.Linear(16, 300, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor([2.0]))


@pytest.fixture
def blocks(monkeypatch):
    monkeypatch.setattr(offload, "BLOCK_BYTES", 16 * 1024)
    allocated = []

    def allocate(nbytes):
        allocated.append(torch.empty(nbytes, dtype=torch.uint8))
        return allocated[-1]

    return allocate, allocated


def storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_copies_keep_values_and_layouts_in_shared_blocks(blocks):
    allocate, allocated = blocks
    model = Model()
    before = {name: t.clone() for name, t in model.state_dict().items()}

    weights = HostWeights(model, allocate)

    assert len(weights.tensors) == 4  # the tied weight once
    assert model.head.weight is model.embed.weight
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert storages(weights.host) == storages(allocated)  # every copy lives in an allocated block
    assert sorted(a.numel() for a in allocated) == [16 * 1024, 300 * 16 * 4]  # one block for the small ones, the embedding alone


def test_taking_back_copies_only_what_changed_on_the_device(blocks):
    allocate, _ = blocks
    model = Model()
    weights = HostWeights(model, allocate)
    assert [id(t) for t in weights.tensors] == [id(model.conv.weight), id(model.conv.bias), id(model.embed.weight), id(model.scale)]
    host_pointers = [h.data_ptr() for h in weights.host]
    embed_before = model.embed.weight.detach().clone()

    weights.lend(torch.device("cpu"))
    assert not storages(weights.tensors) & storages(weights.host)  # lent copies, not the CPU blocks
    assert model.conv(torch.ones(1, 8, 5, 5)).shape == (1, 16, 3, 3)
    weights.host[0].fill_(7.0)  # marks the conv weight's CPU copy: a copy back would overwrite it
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # changed in place: its version counter moves
    model.scale.data = torch.tensor([3.0])  # replaced: a new storage
    weights.take_back()

    assert [t.data_ptr() for t in weights.tensors] == host_pointers  # back on the CPU copies
    assert bool((model.conv.weight == 7.0).all())  # unchanged on the device: not copied back
    torch.testing.assert_close(model.embed.weight.detach(), embed_before + 1.0, rtol=0, atol=0)
    assert float(model.scale) == 3.0
    assert model.head.weight is model.embed.weight


def test_plain_copies_without_an_allocator():
    model = Model()
    original = model.conv.weight.detach()
    weights = HostWeights(model)
    assert model.conv.weight.data_ptr() != original.data_ptr()
    torch.testing.assert_close(model.conv.weight.detach(), original, rtol=0, atol=0)
    assert not any(h.is_pinned() for h in weights.host)


def test_casts_made_on_either_side_are_kept(blocks):
    """SDXL decodes with its VAE cast to float32 and back, while offloaded."""
    allocate, _ = blocks
    model = Model().half()
    weights = HostWeights(model, allocate)
    expected = model.conv.weight.detach().float()
    first_copy = weights.host[0].data_ptr()

    model.float()  # cast while on the CPU: lent as float32
    weights.lend(torch.device("cpu"))
    assert model.conv.weight.dtype == torch.float32
    torch.testing.assert_close(model.conv.weight.detach(), expected, rtol=0, atol=0)
    model.half()  # cast back on the device: kept when taken back
    weights.take_back()
    weights.lend(torch.device("cpu"))
    assert model.conv.weight.dtype == torch.float16
    torch.testing.assert_close(model.conv.weight.detach().float(), expected, rtol=0, atol=0)
    assert weights.host[0].data_ptr() == first_copy  # back in its first (page-locked) copy, not a new one
