"""Images per second of ``gesso batch`` on one GPU, full-size SD1.5 with random weights.

    python benchmarks/batch_throughput.py [--engines local ray] [--items 16] [--steps 50]

Each engine runs the same job twice into fresh folders, with and without the ``fast`` preset; the
first image of a job includes loading (and compiling), so the rate is also given over the items
after the first. The images do not depend on the engine (tests/test_batch_ray.py checks that).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_family  # noqa: E402


def main() -> None:
    import gesso

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["local"])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-batch")
    args = parser.parse_args()
    folder = write_family("sd15", args.scratch / "sd15")
    prompts = [f"a watercolor of a lighthouse, variation {i}" for i in range(args.items)]
    rows = []
    for engine in args.engines:
        for label, optimizations in (("default", "[]"), ("fast", "[fast]")):
            out = args.scratch / f"out-{engine}-{label}"
            shutil.rmtree(out, ignore_errors=True)
            overrides = ["seed=0", f"num_inference_steps={args.steps}", "dtype=float16", f"optimizations={optimizations}"]
            start = time.perf_counter()
            result = gesso.batch(
                prompts, out, model=str(folder), overrides=overrides, engine=engine, workers=1 if engine == "ray" else None
            )
            seconds = time.perf_counter() - start
            stamps = sorted(p.stat().st_mtime for p in out.glob("*.png"))
            steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")
            rows.append(
                {
                    "engine": engine,
                    "preset": label,
                    "images": len(result.written),
                    "seconds": seconds,
                    "images_per_s": len(result.written) / seconds,
                    "steady_images_per_s": steady,
                }
            )
            print(
                f"{engine:6s} {label:8s} {len(result.written)} images in {seconds:6.1f} s: {rows[-1]['images_per_s']:.2f} images/s overall, {steady:.2f} after the first",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
