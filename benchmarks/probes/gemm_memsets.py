"""Probe: which of the step's large matrix products launch a memset, and what each way costs.

    python benchmarks/probes/gemm_memsets.py
    CUBLASLT_WORKSPACE_SIZE=0 python benchmarks/probes/gemm_memsets.py   # the workspace is read once a process

The SDXL step's profile (`benchmarks/results/profile-sdxl-2026-12-02.json`) has a `Memset` right
before each GEGLU projection, cuBLASLt's `nvjet_..._coopA_bias` kernel; in a CUDA graph each memset
is a node with a launch gap of its own. For the GEGLU projections of SDXL and SD1.5, and two other
products of the step for comparison, each way of running the product is timed under a CUDA graph
(`layer_norm.graph_time`, float16) and profiled once for the kernels one call launches:

* ``linear``: ``F.linear`` with its bias (``addmm``: cuBLASLt with the bias in its epilogue), as the
  step runs it;
* ``mm + bias``: the product without bias, the bias added by a second kernel;
* both with cuBLASLt and with cuBLAS as the preferred library (``torch.backends.cuda.preferred_blas_library``).

Prints one line per product and way: microseconds a call, TFLOP/s, and the kernels of one call
(memsets marked).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_norm import graph_time  # noqa: E402

#: (label, rows, in features, out features): rows are batch 2 x tokens.
PRODUCTS = [
    ("sdxl GEGLU 32^2", 2048, 1280, 10240),
    ("sdxl GEGLU 64^2", 8192, 640, 5120),
    ("sd15 GEGLU 64^2", 8192, 320, 2560),
    ("sd15 GEGLU 32^2", 2048, 640, 5120),
    ("sdxl ff out 32^2", 2048, 5120, 1280),
    ("sdxl to_out 32^2", 2048, 1280, 1280),
]


def kernels_of(function: Callable[[], torch.Tensor]) -> list[str]:
    """The names of the kernels (and memsets) one call launches, in order."""
    from torch.profiler import ProfilerActivity, profile

    function()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def ways(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "linear": lambda: F.linear(x, weight, bias),
        "mm + bias": lambda: torch.mm(x, weight.t()) + bias,
    }


def main() -> None:
    print(f"CUBLASLT_WORKSPACE_SIZE={os.environ.get('CUBLASLT_WORKSPACE_SIZE', '(default)')}, torch {torch.__version__}", flush=True)
    generator = torch.Generator("cuda").manual_seed(0)
    default = torch.backends.cuda.preferred_blas_library()
    print(f"preferred BLAS library by default: {default}", flush=True)
    for label, rows, inputs, outputs in PRODUCTS:
        x = torch.randn(rows, inputs, device="cuda", dtype=torch.float16, generator=generator)
        weight = torch.randn(outputs, inputs, device="cuda", dtype=torch.float16, generator=generator) / inputs**0.5
        bias = torch.randn(outputs, device="cuda", dtype=torch.float16, generator=generator)
        flops = 2 * rows * inputs * outputs
        for library in ("cublaslt", "cublas"):
            torch.backends.cuda.preferred_blas_library(library)  # both are tried whichever is the default
            for way, function in ways(x, weight, bias).items():
                names = kernels_of(function)
                memsets = sum("memset" in name.lower() for name in names)
                us = graph_time(function, calls=20)
                listed = ", ".join(("MEMSET " if "memset" in n.lower() else "") + n[:60] for n in names)
                print(
                    f"{label:18s} {library:8s} {way:10s} {us:7.1f} us {flops / us / 1e6:5.0f} TF/s  memsets {memsets}  [{listed}]",
                    flush=True,
                )
        torch.backends.cuda.preferred_blas_library(default)


if __name__ == "__main__":
    main()
