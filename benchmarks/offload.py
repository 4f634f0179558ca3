"""Model CPU offload end to end: the reference's ``enable_model_cpu_offload`` against gesso's
``offload``, same checkpoint and run, with gesso's all-on-GPU run for the offload's own cost.

    python benchmarks/offload.py --families sd15 sdxl --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_family  # noqa: E402
from run import SIZES, STEPS, end_to_end, free  # noqa: E402


def bench(family: str, root: Path) -> dict[str, Any]:
    import diffusers
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    folder = write_family(family, root / family)
    result: dict[str, Any] = {"family": family, "steps": STEPS[family], "e2e_s": {}, "peak_gib": {}}
    reference = diffusers.AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16)
    reference.enable_model_cpu_offload()
    result["e2e_s"]["reference, model CPU offload"], result["peak_gib"]["reference, model CPU offload"] = end_to_end(reference, family)
    reference = None
    free()
    for label, names in (("gesso, offload", ["offload"]), ("gesso, all on the GPU", [])):
        pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
        optimize(pipeline, names)
        result["e2e_s"][label], result["peak_gib"][label] = end_to_end(pipeline, family)
        pipeline = None
        free()
    for label, seconds in result["e2e_s"].items():
        print(f"[{family}] {label:32s} {seconds:7.3f} s  peak held {result['peak_gib'][label]:.2f} GiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=["sd15"], choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-bench")
    args = parser.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families:  # saved after each family, so a time-out keeps what was measured
        results.append(bench(family, args.scratch))
        (args.out / "offload.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
