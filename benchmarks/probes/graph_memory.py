"""Probe: the GPU memory a pipeline holds with CUDA graphs against eager, one variant per process.

    python benchmarks/probes/graph_memory.py sd15 eager
    python benchmarks/probes/graph_memory.py kandinsky22 graphs

Full-size random weights, float16, the family's default size, 2 images (the first captures),
`fuse_qkv, channels_last, cuda_graph` or nothing. Prints one JSON line: memory held (reserved) and
allocated at their peaks, in GiB, and the seconds of the 2 images.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import existing_or_written  # noqa: E402

VARIANTS = ("eager", "graphs")


@torch.no_grad()
def main(family: str, variant: str) -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    folder = existing_or_written(family, Path(tempfile.gettempdir()) / "gesso-bench" / family)
    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
    optimize(pipeline, [] if variant == "eager" else ["fuse_qkv", "channels_last", "cuda_graph"])
    pipeline.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for seed in range(2):
        pipeline("an astronaut in a jungle", generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    torch.cuda.synchronize()
    gib = 2**30
    print(
        json.dumps(
            {
                "family": family,
                "variant": variant,
                "held_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
                "allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
                "seconds_2_images": round(time.perf_counter() - start, 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in VARIANTS:
        sys.exit(f"usage: graph_memory.py FAMILY VARIANT (one of {', '.join(map(repr, VARIANTS))})")
    main(sys.argv[1], sys.argv[2])
