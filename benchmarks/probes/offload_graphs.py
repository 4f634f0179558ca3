"""Probe: `cuda_graph` + `offload`, one SD1.5 image end to end, with the rule that lets a graphed
module whose weights move after one or two calls run eager, and with graphs captured again at every
move instead (the rule switched off). Both pipelines in one process, alternating.

    python benchmarks/probes/offload_graphs.py

Full-size random weights, float16, 50 steps, `fuse_qkv, channels_last, cuda_graph, offload`.
Prints one JSON line: median seconds an image, and which modules ended up eager.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import write_family  # noqa: E402

OPTIMIZATIONS = ["fuse_qkv", "channels_last", "cuda_graph", "offload"]


def recapture_always(graphed: object) -> None:
    graphed.graphs.clear()  # type: ignore[attr-defined]


@torch.no_grad()
def main() -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.optimize.cuda_graph import GraphedForward
    from gesso.runner import optimize

    folder = write_family("sd15", Path(tempfile.gettempdir()) / "gesso-bench" / "sd15")
    rule = GraphedForward._weights_moved
    pipelines = {}
    for label in ("with the rule", "captured again at every move"):
        pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
        optimize(pipeline, OPTIMIZATIONS)
        pipeline.set_progress_bar_config(disable=True)
        pipelines[label] = pipeline
    times: dict[str, list[float]] = {label: [] for label in pipelines}
    for round_ in range(6):
        for label, pipeline in pipelines.items():
            GraphedForward._weights_moved = rule if label == "with the rule" else recapture_always  # type: ignore[method-assign]
            torch.cuda.synchronize()
            start = time.perf_counter()
            pipeline("an astronaut in a jungle", num_inference_steps=50, generator=torch.Generator("cpu").manual_seed(round_))
            torch.cuda.synchronize()
            if round_:  # the first image captures in both
                times[label].append(time.perf_counter() - start)
    GraphedForward._weights_moved = rule  # type: ignore[method-assign]
    graphed = {"unet": lambda p: p.unet, "text_encoder": lambda p: p.text_encoder, "vae.decoder": lambda p: p.vae.decoder}
    eager = {label: [name for name, get in graphed.items() if get(p).forward.eager] for label, p in pipelines.items()}
    print(json.dumps({"image_s": {k: round(statistics.median(v), 4) for k, v in times.items()}, "eager": eager}), flush=True)


if __name__ == "__main__":
    main()
