"""Time from a new process to its first image with the ``fast`` preset (compile cache cold or warm).

    python benchmarks/first_image.py FOLDER   # prints one JSON line: seconds to the first image

Run it twice with the same ``TORCHINDUCTOR_CACHE_DIR``: the first run compiles and fills the cache,
the second shows what a user waits for once the cache is present.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    pipeline = AutoPipelineForText2Image.from_pretrained(sys.argv[1], torch_dtype=torch.float16, device_map="cuda")
    optimize(pipeline, ["fast"])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    pipeline("an astronaut in a jungle", num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0))
    torch.cuda.synchronize()
    print(json.dumps({"first_image_s": time.perf_counter() - START}))


if __name__ == "__main__":
    main()
