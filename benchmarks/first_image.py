"""Time from a new process to its first image (compile caches cold or warm), phase by phase.

    python benchmarks/first_image.py FOLDER [STEPS] [OPTIMIZATION ...]   # one JSON line

Optimizations default to the ``fast`` preset. Run it twice with the same ``TORCHINDUCTOR_CACHE_DIR``:
the first run compiles and fills the cache, the second shows what a user waits for once it is
present. The JSON also says whether the compiler (or transformers) was imported at all.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

IMPORTED_TORCH = time.perf_counter()


def main() -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    phases = {"import torch": IMPORTED_TORCH - START}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    pipeline = AutoPipelineForText2Image.from_pretrained(sys.argv[1], torch_dtype=torch.float16, device_map="cuda")
    torch.cuda.synchronize()
    lap("import gesso + load")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    optimize(pipeline, sys.argv[3:] or ["fast"])
    lap("optimize")
    pipeline.set_progress_bar_config(disable=True)
    pipeline("an astronaut in a jungle", num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0))
    torch.cuda.synchronize()
    lap("first image")
    compiler = sorted(m for m in ("torch._dynamo", "torch._inductor", "transformers") if m in sys.modules)
    print(json.dumps({"first_image_s": time.perf_counter() - START, "phases_s": phases, "imported": compiler}))


if __name__ == "__main__":
    main()
