"""A first compile with its blocks compiled in child processes (``gesso.optimize.parallel``)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.optimize import parallel
from gesso.optimize.precompiled import PrecompiledForward
from gesso.runner import optimize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from gesso_sd15.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # capture and serialisation without code generation (CI time)
    monkeypatch.setenv("GESSO_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GESSO_COMPILE_WORKERS", "2")
    monkeypatch.setattr(PrecompiledForward, "_artifacts", {})
    return tmp_path / "cache"


def images(pipeline):
    return pipeline("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images


def compiled(folder):
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["compile"])
    return pipeline


def test_blocks_are_compiled_in_child_processes_and_give_the_same_image(folder, cache, caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a block was compiled in the parent process")

    plain = images(AutoPipelineForText2Image.from_pretrained(folder))
    monkeypatch.setattr(PrecompiledForward, "_compile", refuse)  # the children compile with their own copy
    with caplog.at_level(logging.INFO, logger="gesso"):
        image = images(compiled(folder))
    np.testing.assert_allclose(image, plain, atol=1e-4)
    (report,) = [r.getMessage() for r in caplog.records]
    count = len(list(cache.iterdir()))
    assert report.startswith(f"compile: {count} blocks compiled in 2 processes in ")


def test_a_failed_child_leaves_its_blocks_to_this_process(folder, cache, caplog, monkeypatch):
    import sys

    plain = images(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = compiled(folder)
    monkeypatch.setattr(sys, "executable", "false")  # every child exits with status 1 at once
    with caplog.at_level(logging.WARNING, logger="gesso"):
        image = images(pipeline)
    np.testing.assert_allclose(image, plain, atol=1e-4)
    assert {r.getMessage() for r in caplog.records} == {
        "compile: a compile worker failed (exit status 1); its blocks compile in this process"
    }
    assert len(list(cache.iterdir())) > 0  # compiled here instead, and kept


def test_children_receive_tensors_as_they_were_without_their_values():
    weight = torch.nn.Parameter(torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)
    expanded = torch.arange(3).expand(4, 3)  # overlapping memory (stride 0)
    buffer = io.BytesIO()
    parallel._WithoutValues(buffer).dump([weight, frozen, expanded])
    assert buffer.getbuffer().nbytes < 2000  # no values travel
    buffer.seek(0)
    for before, after in zip([weight, frozen, expanded], parallel._WithNewValues(buffer).load()):
        assert (after.shape, after.stride(), after.dtype, after.device) == (before.shape, before.stride(), before.dtype, before.device)
        assert type(after) is type(before) and after.requires_grad == before.requires_grad


def test_the_number_of_workers_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("GESSO_COMPILE_WORKERS", "3")
    assert parallel.workers() == 3
    monkeypatch.setenv("GESSO_COMPILE_WORKERS", "many")
    with caplog.at_level(logging.WARNING, logger="gesso"):
        assert 1 <= parallel.workers() <= parallel.MAX_WORKERS
    assert caplog.records[0].getMessage() == "GESSO_COMPILE_WORKERS must be a whole number, not 'many'; using the default"
