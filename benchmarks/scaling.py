"""Multi-GPU scaling of ``gesso batch --engine ray``: images/s over 1, 2, ... N GPUs.

    python benchmarks/scaling.py --families sd15 sdxl --gpus 1 2 4 8 --out benchmarks/results

For each family and GPU count it runs one batch job of ``items-per-gpu x GPUs`` prompts on a
full-size random-weight checkpoint (``checkpoints.py``) with one Ray worker per GPU, and reports the
steady throughput (images after each worker's first — which includes loading and compiling —
over the time they took) and the scaling efficiency ``rate(N) / (N x rate(1))`` (goal: >= 0.9).
``--model`` runs an existing checkpoint instead; ``--device cpu`` runs on CPU workers (for testing).
NVLink multicast stays off (the lent machines require it), also in the workers' environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = {"sd15": 50, "sdxl": 30}


def steady_rate(folder: Path, workers: int) -> float:
    """Images per second after the first image of each worker, read off the files' times."""
    stamps = sorted(p.stat().st_mtime for p in folder.glob("*.png"))
    if len(stamps) <= workers or stamps[-1] <= stamps[workers - 1]:
        return float("nan")
    return (len(stamps) - workers) / (stamps[-1] - stamps[workers - 1])


def run_scaling(
    family: str, model: str, gpus: list[int], items_per_gpu: int, scratch: Path, device: str, steps: int | None
) -> dict[str, Any]:
    import gesso

    overrides = ["seed=0", f"num_inference_steps={steps or STEPS.get(family, 30)}"]
    if device == "cuda":
        overrides += ["dtype=float16", "optimizations=[fast]"]
    rows = []
    for count in gpus:
        out = scratch / f"{family}-{count}"
        shutil.rmtree(out, ignore_errors=True)
        prompts = [f"a lighthouse at dusk, variation {i}" for i in range(items_per_gpu * count)]
        start = time.perf_counter()
        result = gesso.batch(prompts, out, model=model, overrides=overrides, engine="ray", workers=count, batch_size=2)
        rows.append(
            {
                "workers": count,
                "images": len(result.written),
                "failed": len(result.failed),
                "seconds": time.perf_counter() - start,
                "steady_images_per_s": steady_rate(out, count),
            }
        )
        print(
            f"[{family}] {count} worker(s): {rows[-1]['images']} images, {rows[-1]['steady_images_per_s']:.2f} images/s steady", flush=True
        )
    base = rows[0]["steady_images_per_s"] / rows[0]["workers"]
    for row in rows:
        row["efficiency"] = row["steady_images_per_s"] / (row["workers"] * base) if base > 0 else float("nan")
    return {"family": family, "model": model, "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'family':8s} {'workers':>7s} {'images/s':>9s} {'efficiency':>10s}"]
    for result in results:
        for row in result["rows"]:
            lines.append(f"{result['family']:8s} {row['workers']:7d} {row['steady_images_per_s']:9.2f} {row['efficiency']:10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15"])
    parser.add_argument("--gpus", nargs="+", type=int, default=None, help="worker counts (default: 1, 2, 4 ... up to the GPUs present)")
    parser.add_argument("--items-per-gpu", type=int, default=8)
    parser.add_argument("--model", help="an existing checkpoint (one family) instead of a written full-size one")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-scaling")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import torch

    available = torch.cuda.device_count() if args.device == "cuda" else 2
    gpus = args.gpus or [n for n in (1, 2, 4, 8) if n <= max(available, 1)]
    results = []
    for family in args.families:
        if args.model:
            model = args.model
        else:
            from checkpoints import write_family

            model = str(write_family(family, args.scratch / f"checkpoint-{family}"))
        results.append(run_scaling(family, model, gpus, args.items_per_gpu, args.scratch, args.device, args.steps))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
