"""One warm image, end to end, phase by phase: text encoding, the denoising loop, decoding, the
safety check and the conversion to PIL.

    python benchmarks/e2e_phases.py --families sd15 sdxl [--optimizations fast compile_vae]

Each phase is timed between device synchronisations, so the phases add up to the whole call (the
synchronisations cost a few microseconds each). Writes nothing; prints one JSON line per family.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_family  # noqa: E402

STEPS = {"sd15": 50, "sdxl": 30}


def timed(phases: dict[str, float], name: str, function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        torch.cuda.synchronize()
        phases[name] += time.perf_counter() - start
        return result

    return wrapper


@torch.no_grad()
def measure(family: str, folder: Path, optimizations: list[str], repeat: int = 3) -> dict[str, Any]:
    import gesso.pipeline
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
    optimize(pipeline, optimizations)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "an astronaut in a jungle, cold color palette", "num_inference_steps": STEPS[family]}
    pipeline(**kwargs, generator=torch.Generator("cpu").manual_seed(0))  # compile, capture
    runs = []
    for _ in range(repeat):
        phases: dict[str, float] = defaultdict(float)
        for name in ("encode", "decode", "check_safety"):
            setattr(pipeline, name, timed(phases, name, getattr(type(pipeline), name).__get__(pipeline)))
        original_postprocess = gesso.pipeline.postprocess
        gesso.pipeline.postprocess = timed(phases, "postprocess", original_postprocess)
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            pipeline(**kwargs, generator=torch.Generator("cpu").manual_seed(0))
            torch.cuda.synchronize()
            total = time.perf_counter() - start
        finally:
            gesso.pipeline.postprocess = original_postprocess
        phases["denoising loop and the rest"] = total - sum(phases.values())
        phases["total"] = total
        runs.append(phases)
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15"], choices=sorted(STEPS))
    parser.add_argument("--optimizations", nargs="*", default=["fast", "compile_vae"])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-bench")
    args = parser.parse_args()
    for family in args.families:
        folder = write_family(family, args.scratch / family)
        phases = measure(family, folder, args.optimizations)
        print(
            json.dumps(
                {"family": family, "optimizations": args.optimizations, "phases_ms": {k: round(v * 1000, 2) for k, v in phases.items()}}
            )
        )
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
