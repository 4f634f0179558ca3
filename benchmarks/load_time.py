"""Warm load time: a checkpoint folder (in the page cache) to a pipeline ready on the GPU.

    python benchmarks/load_time.py --families sd15 sdxl

Times, in the same run and interleaved, the reference's ``from_pretrained(...).to("cuda")``,
gesso's same call, and gesso's ``from_pretrained(..., device_map="cuda")``, which copies each
weight file to the GPU from a page-locked mapping. Median of 3 after one warm-up round; writes
``load_time-DATE.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_family  # noqa: E402
from run import free, load_reference  # noqa: E402


def seconds(load: Callable[[], Any]) -> float:
    start = time.perf_counter()
    pipeline = load()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del pipeline
    free()
    return elapsed


def loaders(folder: Path) -> dict[str, Callable[[], Any]]:
    from gesso import AutoPipelineForText2Image

    return {
        "reference .to": lambda: load_reference(folder)[0],
        "gesso .to": lambda: AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16).to("cuda"),
        "gesso device_map": lambda: AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-bench")
    args = parser.parse_args()
    import diffusers

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "reference": f"diffusers {diffusers.__version__}",
    }
    for family in args.families:
        folder = write_family(family, args.scratch / family)
        free()
        family_loaders = loaders(folder)
        times: dict[str, list[float]] = {name: [] for name in family_loaders}
        for round_index in range(4):  # round 0 warms the page cache and the libraries
            for name, load in family_loaders.items():
                elapsed = seconds(load)
                if round_index:
                    times[name].append(elapsed)
        results[family] = {name: statistics.median(values) for name, values in times.items()}
        print(family, "  ".join(f"{name} {value:.3f} s" for name, value in results[family].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load_time-{results['date']}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
