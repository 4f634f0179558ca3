"""Compiled blocks kept on disk (``gesso.optimize.precompiled``): what is saved, what is reused, and
what happens when an artifact does not fit.

Most tests compile with the ``aot_eager`` backend (the whole capture and serialisation path, without
code generation); one compiles with Inductor, whose C++ build takes seconds per block on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import small_block
import torch
from gesso.optimize.precompiled import PrecompiledForward, artifact_key, precompile_block
from torch.utils import _pytree as pytree


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty compile cache, and no compilations left in memory by other tests."""
    monkeypatch.setenv("GESSO_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(PrecompiledForward, "_artifacts", {})
    return tmp_path


CHILD = small_block.SETUP + textwrap.dedent(
    """
    import json
    from gesso.optimize.precompiled import PrecompiledForward, precompile_block

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again instead of loaded")

    PrecompiledForward._compile = refuse
    with torch.no_grad():
        eager = block(x, temb)
        precompile_block(block, {})
        out = block(x, temb)
    print(json.dumps({"error": (out - eager).abs().max().item()}))
    """
)


def test_an_inductor_compiled_block_matches_eager_and_loads_in_a_new_process(cache):
    block = small_block.block()
    x, temb = small_block.inputs()
    with torch.no_grad():
        eager = block(x, temb)
        precompile_block(block, {})  # the default backend: Inductor
        compiled = block(x, temb)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    artifacts = list(cache.glob("ResnetBlock2D-*.bin"))
    assert len(artifacts) == 1

    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env={**os.environ, "GESSO_COMPILE_CACHE": str(cache)}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["error"] < 1e-5
    assert list(cache.glob("ResnetBlock2D-*.bin")) == artifacts


def test_a_damaged_artifact_is_compiled_again_with_a_warning(cache, caplog):
    block = small_block.block()
    x, temb = small_block.inputs()
    with torch.no_grad():
        eager = block(x, temb)
        precompile_block(block, {"backend": "aot_eager"})
        block(x, temb)
        (artifact,) = cache.iterdir()
        artifact.write_bytes(b"not a compiled function")
        PrecompiledForward._artifacts.clear()  # as a new process would
        again = small_block.block()
        precompile_block(again, {"backend": "aot_eager"})
        with caplog.at_level(logging.WARNING, logger="gesso"):
            out = again(x, temb)
    torch.testing.assert_close(out, eager)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"compile: could not load {artifact.name}"]
    assert artifact.read_bytes() != b"not a compiled function"  # replaced by the new compilation


def test_weights_changing_dtype_get_their_own_compilation(cache):
    block = small_block.block()
    precompile_block(block, {"backend": "aot_eager"})
    with torch.no_grad():
        block(*small_block.inputs())
        block.double()
        x, temb = small_block.inputs(torch.float64)
        out = block(x, temb)
        block.__dict__.pop("forward")
        eager = block(x, temb)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, eager)
    assert len(list(cache.iterdir())) == 2


def test_a_block_that_cannot_be_compiled_ahead_of_time_is_compiled_just_in_time(cache, caplog, monkeypatch):
    import torch._dynamo.aot_compile

    def unsupported(*args, **kwargs):
        raise RuntimeError("not serialisable here")

    monkeypatch.setattr(torch._dynamo.aot_compile, "aot_compile_fullgraph", unsupported)
    block = small_block.block()
    x, temb = small_block.inputs()
    with torch.no_grad():
        eager = block(x, temb)
        precompile_block(block, {"backend": "aot_eager"})
        with caplog.at_level(logging.WARNING, logger="gesso"):
            out = block(x, temb)
    torch.testing.assert_close(out, eager)
    assert [r.getMessage() for r in caplog.records] == [
        "compile: ResnetBlock2D cannot be compiled ahead of time (RuntimeError: not serialisable here); compiling it just in time"
    ]
    assert list(cache.iterdir()) == []


def test_the_key_follows_what_the_compiled_code_depends_on():
    block = small_block.block()
    x, temb = small_block.inputs()

    def key(module, *args, **options):
        leaves, spec = pytree.tree_flatten((args, {}))
        return artifact_key(module, leaves, spec, options)

    base = key(block, x, temb)
    assert key(small_block.block(), x, temb) == base  # another block of the same class, settings and shapes
    changed = small_block.block()
    changed.output_scale_factor = 2.0
    assert key(changed, x, temb) != base
    assert key(block, x[:1], temb[:1]) != base
    assert key(block, x.contiguous(memory_format=torch.channels_last), temb) != base
    assert key(block, x, temb, mode="max-autotune") != base
    assert key(block.double(), x.double(), temb.double()) != base
