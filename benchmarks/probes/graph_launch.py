"""Probe: what a replay of a large CUDA graph costs beyond its kernels.

    python benchmarks/probes/graph_launch.py [--family sd15]

The ControlNet's step ran 0.32 ms faster as one graph than as the net's graph then the UNet's,
back to back (``benchmarks/NOTES.md``, sixteenth session). If every replay of a large graph costs
that much on the GPU, every family pays it once a step. Full-size random weights, float16, batch 2,
``fast``'s members less ``cuda_graph``; medians of CUDA-event timings per UNet call:

- one call a graph, one replay a timing (what ``benchmarks/run.py`` times);
- one call a graph, two replays back to back a timing, halved;
- two calls in one graph, one replay a timing, halved;
- a one-kernel graph, one replay a timing (the cost of a replay with nothing in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layer_norm import captured  # noqa: E402  (this folder: the script's own)
from profile_step import build  # noqa: E402
from run import cuda_median_ms, fast_members  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    args = parser.parse_args()

    from gesso.contract import ExecutionPolicy
    from gesso.runner import optimize

    holder, step, family = build(args.family)
    policy = ExecutionPolicy(hot_loop=holder.hot_loop)
    names = [n for n in fast_members(family, policy) if n != "cuda_graph"]
    optimize(holder, names, device="cuda", family=family, policy=policy)
    with torch.no_grad():
        (one, _), (two, _) = captured(step), captured(step, 2)
        x = torch.zeros(1, device="cuda")
        empty, _ = captured(lambda: x.add_(1))
        ms = {}
        for _ in range(2):  # two rounds, alternating
            ms.setdefault("one call a graph, one replay", []).append(cuda_median_ms(one.replay))
            ms.setdefault("one call a graph, two replays, halved", []).append(cuda_median_ms(lambda: (one.replay(), one.replay())) / 2)
            ms.setdefault("two calls in one graph, halved", []).append(cuda_median_ms(two.replay) / 2)
            ms.setdefault("a one-kernel graph", []).append(cuda_median_ms(empty.replay))
    for name, values in ms.items():
        print(f"{name:42s} " + " / ".join(f"{v:.3f}" for v in values) + " ms", flush=True)
    print(json.dumps({"family": args.family, "optimizations": names, "ms": ms}))


if __name__ == "__main__":
    main()
