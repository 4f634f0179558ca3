"""Probe: GroupNorm + SiLU at the VAE decoder's shapes (batch 1, large maps), compiled.

    python benchmarks/probes/group_norm.py [vae | unet | sdxl ...]

Inductor's own lowering of ``F.group_norm`` against ``gesso.nn.normalization.group_norm_in_chunks``
with several chunk counts, channels-last (what ``fast`` gives the VAE), timed as 20 calls inside a
CUDA graph, beside the time one read and one write of the map take at 3.3 TB/s (the statistics
pass reads it once more)."""

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gesso.nn.normalization import group_norm_in_chunks  # noqa: E402
from gesso.optimize import heuristics  # noqa: E402
from layer_norm import graph_time  # noqa: E402

SHAPES = [  # (label, batch, channels, side, dtype)
    ("sd15 vae 64^2", 1, 512, 64, torch.float16),
    ("sd15 vae 128^2", 1, 512, 128, torch.float16),
    ("sd15 vae 256^2", 1, 256, 256, torch.float16),
    ("sd15 vae 512^2", 1, 128, 512, torch.float16),
    ("sdxl vae 128^2", 1, 512, 128, torch.float32),
    ("sdxl vae 256^2", 1, 512, 256, torch.float32),
    ("sdxl vae 512^2", 1, 256, 512, torch.float32),
    ("sdxl vae 1024^2", 1, 128, 1024, torch.float32),
    ("sd15 unet 64^2", 2, 320, 64, torch.float16),
    ("sdxl unet 128^2", 2, 320, 128, torch.float16),
    ("sdxl unet 128^2", 2, 640, 128, torch.float16),
    ("sdxl unet 128^2", 2, 960, 128, torch.float16),
    ("sdxl unet 64^2", 2, 640, 64, torch.float16),
]
CHUNKS = (1, 16, 64, 256)


def library(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-6))


def chunked(x, w, b, chunks):
    return F.silu(group_norm_in_chunks(x, 32, w, b, 1e-6, chunks))


def main():
    torch.manual_seed(0)
    chosen = [shape for shape in SHAPES if not sys.argv[1:] or any(word in shape[0] for word in sys.argv[1:])]
    print(f"{'shape':>16s} {'MB':>6s} {'floor':>6s} {'eager':>7s} " + " ".join(f"{'chunks ' + str(c):>10s}" for c in CHUNKS))
    for label, batch, channels, side, dtype in chosen:
        x = torch.randn(batch, channels, side, side, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, device="cuda", dtype=dtype)
        b = torch.randn(channels, device="cuda", dtype=dtype)
        expected = library(x.double(), w.double(), b.double())
        nbytes = x.numel() * x.element_size()
        row = [graph_time(functools.partial(library, x, w, b))]
        for chunks in CHUNKS:
            function = torch.compile(library if chunks == 1 else functools.partial(chunked, chunks=chunks), dynamic=False)
            with heuristics.active():
                out = function(x, w, b)
            error = float((out.double() - expected).abs().max())
            row.append(graph_time(functools.partial(function, x, w, b)) if error < 5e-2 else float("nan"))
        print(f"{label:>16s} {nbytes / 1e6:6.1f} {2 * nbytes / 3.3e6:6.1f} " + " ".join(f"{t:10.1f}" for t in row))
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
