"""Probe: can Inductor's own matrix-product templates beat cuBLAS + a separate gate kernel on the
GEGLU feed-forward, by taking the gate into the output projection's prologue?

    python benchmarks/probes/ff_autotune.py

In the SDXL step the feed-forward is cuBLAS's projection to 10,240 columns, Inductor's gate kernel
(22 µs a call, reading the 42 MB projection back) and cuBLAS's output projection. With
``max-autotune`` and Triton among the GEMM backends, Inductor may run a matrix product as a Triton
template and fuse the gate into the loads of the product that follows (prologue fusion); on Hopper
its persistent TMA template is the one that could match cuBLAS's rate. Each way is compiled alone,
timed under a CUDA graph (`layer_norm.graph_time`, float16) and profiled once for its kernels.
Prints microseconds a call, the effective TFLOP/s of both products, the compile time, the largest
relative difference from eager, and the kernels one call launches.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_memsets import kernels_of  # noqa: E402
from layer_norm import graph_time  # noqa: E402

#: (label, rows, width): rows are batch 2 x tokens; the inner width is four times the width.
SHAPES = [("sdxl 32^2", 2048, 1280), ("sdxl 64^2", 8192, 640), ("sd15 64^2", 8192, 320)]

WAYS = {
    "default compile": {},
    "max-autotune, Triton + ATen": {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "max-autotune, persistent TMA": {
        "max_autotune": True,
        "max_autotune_gemm_backends": "ATEN,TRITON",
        "triton.enable_persistent_tma_matmul": True,
    },
}


def feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    hidden, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(hidden * F.gelu(gate), w2, b2)


def main() -> None:
    print(f"torch {torch.__version__}", flush=True)
    generator = torch.Generator("cuda").manual_seed(0)
    for label, rows, width in SHAPES:
        inner = 4 * width
        x = torch.randn(rows, width, device="cuda", dtype=torch.float16, generator=generator)
        w1 = torch.randn(2 * inner, width, device="cuda", dtype=torch.float16, generator=generator) / width**0.5
        b1 = torch.randn(2 * inner, device="cuda", dtype=torch.float16, generator=generator) * 0.1
        w2 = torch.randn(width, inner, device="cuda", dtype=torch.float16, generator=generator) / inner**0.5
        b2 = torch.randn(width, device="cuda", dtype=torch.float16, generator=generator) * 0.1
        flops = 2 * rows * width * 2 * inner + 2 * rows * inner * width
        with torch.no_grad():
            expected = feed_forward(x.float(), w1.float(), b1.float(), w2.float(), b2.float())
            for way, options in WAYS.items():
                torch._dynamo.reset()
                compiled = torch.compile(feed_forward, options=options or None, dynamic=False)
                started = time.perf_counter()
                try:
                    out = compiled(x, w1, b1, w2, b2)
                    torch.cuda.synchronize()
                    seconds = time.perf_counter() - started
                    error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
                    call = partial(compiled, x, w1, b1, w2, b2)
                    us = graph_time(call, calls=20)
                    names = ", ".join(n[:70] for n in kernels_of(call))
                except Exception as failure:  # a backend missing on this machine must not stop the others
                    print(f"{label:10s} {way:30s} failed: {str(failure).splitlines()[0][:160]}", flush=True)
                    continue
                print(
                    f"{label:10s} {way:30s} {us:7.1f} us {flops / us / 1e6:5.0f} TF/s  compile {seconds:5.1f} s  "
                    f"rel. error {error:.1e}  [{names}]",
                    flush=True,
                )


if __name__ == "__main__":
    main()
