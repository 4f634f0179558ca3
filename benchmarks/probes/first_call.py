"""Probe: what cuDNN's timed algorithm choice costs the first call of a full-size denoiser.

    python benchmarks/probes/first_call.py kandinsky22 on     # then: ... kandinsky22 off, in a new process

PyTorch keeps the algorithm it first chose for a convolution shape for the rest of the process, so
each setting needs a process of its own. The denoiser is built from the published config with
random weights (``profile_step.build``), float16, channels-last, eager; cuDNN is loaded by a small
convolution first, so the first call's extra time is the timing of algorithms. Prints the seconds
of three calls and the peak memory allocated (which includes any workspace cuDNN tried).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import SIZES, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(SIZES))
    parser.add_argument("benchmark", choices=["on", "off"], help="torch.backends.cudnn.benchmark for the whole process")
    args = parser.parse_args()
    holder, step, _ = build(args.family)
    for name in holder.hot_loop:
        getattr(holder, name).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 16, 16, device="cuda", dtype=torch.float16)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float16))  # load cuDNN first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.backends.cudnn.benchmark = args.benchmark == "on"
    seconds = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{args.family} benchmark={args.benchmark}: calls {', '.join(f'{s:.3f}' for s in seconds)} s, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
