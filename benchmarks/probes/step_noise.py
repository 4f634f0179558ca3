"""Probe: ancestral schedulers' per-step noise sent to the GPU with a wait (a pageable copy, as the
reference sends it) against without one (page-locked, `gesso.noise`), in one process, alternating.

    python benchmarks/probes/step_noise.py

Full-size random weights, float16, `fast` + `compile_vae`: Kandinsky 2.2 at its defaults (512x512,
25 prior steps and 100 decoder steps, both schedulers ancestral) and SD1.5 with Euler ancestral, 50
steps. Prints one JSON line: median seconds an image per family and way of sending, and whether
the two ways gave the same image.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import existing_or_written  # noqa: E402

PROMPT = "an astronaut in a jungle, cold color palette"
#: The modules whose schedulers draw noise at every step.
STEP_NOISE_MODULES = ("gesso.schedulers.ddpm", "gesso.schedulers.kdiffusion")


def noise_with_a_wait(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, device="cpu", dtype=dtype).to(device)


@contextlib.contextmanager
def sent_with_a_wait() -> Iterator[None]:
    import importlib

    modules = [importlib.import_module(name) for name in STEP_NOISE_MODULES]
    saved = [module.randn_tensor for module in modules]
    for module in modules:
        module.randn_tensor = noise_with_a_wait
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.randn_tensor = original


def timed_image(pipeline: Any) -> tuple[float, Any]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images
    torch.cuda.synchronize()
    return time.perf_counter() - start, image


@torch.no_grad()
def main() -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize
    from gesso.schedulers import EulerAncestralDiscreteScheduler

    root = Path(tempfile.gettempdir()) / "gesso-bench"
    kandinsky, sd15 = (existing_or_written(name, root / name) for name in ("kandinsky22", "sd15"))
    results: dict[str, Any] = {}
    for label, folder in (("kandinsky22 512², 25 + 100 steps", kandinsky), ("sd15 euler ancestral, 50 steps", sd15)):
        pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
        if "sd15" in label:
            pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)
        optimize(pipeline, ["fast", "compile_vae"])
        pipeline.set_progress_bar_config(disable=True)
        times: dict[str, list[float]] = {"with a wait": [], "without": []}
        images: dict[str, Any] = {}
        for round_ in range(7):
            for way in times:
                with sent_with_a_wait() if way == "with a wait" else contextlib.nullcontext():
                    seconds, images[way] = timed_image(pipeline)
                if round_:  # the first round compiles and captures
                    times[way].append(seconds)
        results[label] = {way: round(statistics.median(t), 4) for way, t in times.items()}
        results[label]["same image"] = bool(torch.equal(images["with a wait"], images["without"]))
        del pipeline
        torch.cuda.empty_cache()
    print(json.dumps(results, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
