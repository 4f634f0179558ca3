"""Probe: Kandinsky 2.2 end to end with its prior as a hot loop (fused, compiled, graphed) against
the prior only graphed, in one process, alternating, so that machine drift falls on both.

    python benchmarks/probes/prior_placement.py

Full-size random weights, float16, 512x512, 25 prior steps and 100 decoder steps, `fast` +
`compile_vae`. Prints one JSON line: median seconds end to end and of the prior alone, per placement.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import existing_or_written  # noqa: E402

PROMPT = "an astronaut in a jungle, cold color palette"


def once(function: Any, *args: Any, **kwargs: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    function(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.plugins import get_host
    from gesso.runner import optimize

    folder = existing_or_written("kandinsky22", Path(tempfile.gettempdir()) / "gesso-bench" / "kandinsky22")
    family = get_host().registry.families["kandinsky"].execution_policy
    graphed_only = dataclasses.replace(
        family, hot_loop=("unet",), per_image=(*family.per_image, *[name for name in family.hot_loop if name != "unet"])
    )
    pipelines = {}
    for label, policy in (("prior as a hot loop", family), ("prior graphed only", graphed_only)):
        pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
        optimize(pipeline, ["fast", "compile_vae"], policy=policy)
        pipeline.set_progress_bar_config(disable=True)
        pipelines[label] = pipeline
    times: dict[str, dict[str, list[float]]] = {label: {"e2e_s": [], "prior_s": []} for label in pipelines}
    for round_ in range(6):
        for label, pipeline in pipelines.items():
            e2e = once(pipeline, PROMPT, generator=torch.Generator("cpu").manual_seed(0))
            prior_s = once(pipeline.prior_pipe, PROMPT, generator=torch.Generator("cpu").manual_seed(0))
            if round_:  # the first round compiles and captures
                times[label]["e2e_s"].append(e2e)
                times[label]["prior_s"].append(prior_s)
    print(json.dumps({label: {k: round(statistics.median(v), 4) for k, v in t.items()} for label, t in times.items()}), flush=True)


if __name__ == "__main__":
    main()
