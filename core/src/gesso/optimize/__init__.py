"""Built-in optimizations, registered through the optimization hook like any plugin's.

Each is a function ``apply(pipeline, policy)`` that changes a loaded pipeline in place, within what
the family's :class:`~gesso.contract.ExecutionPolicy` allows; :mod:`gesso.builtin` registers them
with the devices they support. They compose in their registered order: layout and fusion first,
then compilation, then CUDA-graph capture of what is compiled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Named sets of optimizations (the CLI's ``optimizations=[fast]``).
PRESETS: dict[str, list[str]] = {
    "fast": [
        "fuse_qkv",
        "fuse_time_projections",
        "channels_last",
        "compile",
        "cuda_graph",
        "cross_kv_once",
        "conditioning_once",
        "decoder_attention_bf16x3",
    ]
}


def hot_loop_modules(pipeline: Any, policy: Any) -> dict[str, torch.nn.Module]:
    """The modules run at every denoising step: the family's ``hot_loop`` and its conditioners'."""
    modules = {name: getattr(pipeline, name, None) for name in policy.hot_loop}
    for conditioner in getattr(pipeline, "conditioners", []):
        modules.update(conditioner.modules())
    return {name: m for name, m in modules.items() if isinstance(m, torch.nn.Module)}


def wrapper_chain(forward: Any) -> Iterator[Any]:
    """``forward``, then each callable it wraps: optimizations wrap a module's ``forward`` with objects
    that keep the one they wrap as their own ``forward`` attribute."""
    while forward is not None:
        yield forward
        forward = getattr(forward, "forward", None)


def per_image_modules(pipeline: Any, policy: Any) -> dict[str, torch.nn.Module]:
    """The modules run once per image with fixed shapes: the family's ``per_image`` paths
    (``"vae.decoder"`` reaches a submodule), those the pipeline has."""
    modules = {}
    for path in policy.per_image:
        module = pipeline
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.Module):
            modules[path] = module
    return modules


def channels_last(pipeline: Any, policy: Any) -> None:
    """Convolutions in NHWC memory order, which cuDNN's tensor-core kernels read without transposes."""
    for module in [*hot_loop_modules(pipeline, policy).values(), getattr(pipeline, policy.image_decoder, None)]:
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)


def fuse_qkv(pipeline: Any, policy: Any) -> None:
    """One matrix product for q/k/v of every self-attention, and for k/v of every cross-attention."""
    from gesso.nn.attention import Attention

    for module in hot_loop_modules(pipeline, policy).values():
        for name, attention in module.named_modules():
            if type(attention) is Attention:  # subclasses (Kandinsky's added-KV attention) project their own way
                attention.fuse_projections(self_attention=not name.endswith("attn2"))


def fuse_time_projections(pipeline: Any, policy: Any) -> None:
    """One matrix product a step for the time projections of all the resnets of each denoiser
    (``gesso.nn.time_projections``): a denoiser offers it with a ``fuse_time_projections`` method."""
    for module in hot_loop_modules(pipeline, policy).values():
        for denoiser in module.modules():  # a MultiControlNet's nets too
            fuse = getattr(denoiser, "fuse_time_projections", None)
            if callable(fuse):
                fuse()


def vae_tiling(pipeline: Any, policy: Any) -> None:
    """Decode large images tile by tile (memory bounded by the tile, not the image)."""
    vae = getattr(pipeline, policy.image_decoder, None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        raise ValueError(f"optimization 'vae_tiling' needs a VAE with tiled decoding; this pipeline's {policy.image_decoder!r} has none")
    vae.enable_tiling()


class RunWithin:
    """A module's ``forward``, each call inside a fresh ``context()``. It keeps the forward it wraps as
    its own ``forward``, so that :func:`wrapper_chain` walks past it to the wrappers beneath."""

    def __init__(self, forward: Callable[..., Any], context: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self.forward = forward
        self.context = context

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.context():
            return self.forward(*args, **kwargs)


def run_within(module: torch.nn.Module, context: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
    """Make every call of ``module`` run inside a fresh ``context()``: a setting that only its calls
    should see, and that the rest of the process keeps as it was."""
    module.forward = RunWithin(module.forward, context)


def _sdpa_backend(name: str) -> Any:
    def apply(pipeline: Any, policy: Any) -> None:
        """Run the hot loop's attention with one SDPA kernel family only."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, name)
        for module in hot_loop_modules(pipeline, policy).values():
            run_within(module, lambda: sdpa_kernel([backend]))

    return apply


sdpa_flash = _sdpa_backend("FLASH_ATTENTION")
sdpa_cudnn = _sdpa_backend("CUDNN_ATTENTION")
sdpa_efficient = _sdpa_backend("EFFICIENT_ATTENTION")


@contextlib.contextmanager
def cudnn_benchmarking() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on for the block, and back to what it was after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def cudnn_benchmark(pipeline: Any, policy: Any) -> None:
    """Let cuDNN time its convolution algorithms for each shape the hot loop runs, and keep the fastest.

    Without it cuDNN picks an algorithm per shape from its heuristics, without running any; for
    some shapes that pick is well off the fastest (Kandinsky 2.2's maps of 384, 1,152 and 1,536
    channels; measured in ``benchmarks/NOTES.md``). PyTorch keeps the first choice made for a shape
    for the rest of the process, whichever way it was made, so the timing is paid once, in the first
    call of each shape (in a CUDA graph's warm-up calls, before its capture), and it must come before
    any untimed call of that shape. Only the hot loop's calls run with the setting on: the rest of
    the process keeps its own. Timing can pick another algorithm in another process when two are
    about as fast, so images of two processes may differ in float16 rounding.
    """
    for module in hot_loop_modules(pipeline, policy).values():
        run_within(module, cudnn_benchmarking)
