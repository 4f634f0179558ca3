"""Probe: Kandinsky 2.2's prior, phase by phase (text encoding, the zero-image embedding, the
prior's steps, the scheduler's steps, the rest), eager and with the family's graphs.

    python benchmarks/probes/prior.py

Full-size random weights (``checkpoints.write_kandinsky``), float16, the prior's defaults (25 steps,
guidance 4). Each phase is timed between device synchronisations, so the phases add up to the call
(the synchronisations also keep the CPU from running ahead, so the total is an upper bound). The
GPU time of one call comes from the profiler. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import existing_or_written  # noqa: E402
from outside_steps import wall_ms  # noqa: E402
from profile_step import device_us, is_kernel  # noqa: E402

PROMPT = "an astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def timed(phases: dict[str, float], counts: dict[str, int], name: str, function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        torch.cuda.synchronize()
        phases[name] += (time.perf_counter() - start) * 1000
        counts[name] += 1
        return result

    return wrapper


@torch.no_grad()
def measure(folder: Path, optimizations: list[str]) -> dict[str, Any]:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
    optimize(pipeline, optimizations)
    prior = pipeline.prior_pipe
    prior.set_progress_bar_config(disable=True)

    def call() -> Any:
        return prior(PROMPT, generator=torch.Generator("cpu").manual_seed(0))

    call()  # warm-up, captures
    result: dict[str, Any] = {"optimizations": optimizations, "call_ms": wall_ms(call, repeat=5)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in profile.key_averages() if is_kernel(e)]
    result["gpu_ms"] = round(sum(map(device_us, kernels)) / 1000, 3)
    result["kernels"] = sum(e.count for e in kernels)
    heaviest = sorted(kernels, key=device_us, reverse=True)[:12]
    result["heaviest_kernels"] = [(e.key[:110], e.count, round(device_us(e) / 1000, 3)) for e in heaviest]

    phases: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name in ("prior_text_encoder", "prior_image_encoder", "prior_prior"):
        module = getattr(pipeline, name)
        module.forward = timed(phases, counts, name, module.forward)
    prior.scheduler.step = timed(phases, counts, "scheduler step", prior.scheduler.step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) * 1000
    result["phases_ms"] = {name: round(ms, 3) for name, ms in phases.items()}
    result["phases_ms"]["the rest"] = round(total - sum(phases.values()), 3)
    result["calls"] = dict(counts)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-bench")
    parser.add_argument("--variants", nargs="*", default=["", "cuda_graph", "fast"], help="comma-separated optimizations per variant")
    args = parser.parse_args()
    folder = existing_or_written("kandinsky22", args.scratch / "kandinsky22")
    for variant in args.variants:
        print(json.dumps(measure(folder, [name for name in variant.split(",") if name])), flush=True)


if __name__ == "__main__":
    main()
