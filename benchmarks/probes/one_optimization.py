"""Probe: `fast` with and without one optimization (default `fuse_time_projections`), in one
process, alternating.

    python benchmarks/probes/one_optimization.py [--optimization NAME] [--families sd15 sdxl controlnet kandinsky]

Full-size random weights, float16, both pipelines loaded side by side from one checkpoint folder,
`compile_vae` on both; "without" is `fast` as the family gets it (plugins' members included) less
NAME where it is a member. Per family: the denoiser step replayed from its CUDA graph (median of
CUDA-event timings, three rounds each way, the inputs the same tensors at every call as in a
generation; for `controlnet`, the net's and the UNet's calls through the conditioner, as a pipeline
step makes them; for `kandinsky`, the decoder UNet at 768x768), one image end to end (median of four each
way; Kandinsky: one, prior included, at its default 512x512), the largest difference between the two
ways' images, and the memory held. Prints one JSON line per family. (It measured `cross_kv_once`,
`fuse_time_projections`, `control_embedding_once`, `conditioning_once` and `controlnet_side_stream`
before they joined `fast`.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import _clean, architectures, existing_or_written, fill_random  # noqa: E402
from run import controlnet_step, cuda_median_ms, fast_members, unet_inputs  # noqa: E402

PROMPT = "an astronaut in a jungle, cold color palette"


def ways(name: str, family: str) -> dict[str, list[str]]:
    """The two ways compared: ``fast`` (less ``name``) + ``compile_vae``, and the same with ``name``;
    ``fast`` as the family gets it, plugins' members included."""
    from gesso.plugins import get_host

    plugin_family = {"controlnet": "sd15"}.get(family, family)
    fast = fast_members(plugin_family, get_host().registry.families[plugin_family].execution_policy)
    without = [m for m in fast if m != name] + ["compile_vae"]
    return {f"fast without {name}": without, f"fast with {name}": [*without, name]}


def controlnet_folder(folder: Path) -> Path:
    """The full-size SD1.5 ControlNet with random weights, written by the reference (as ``run.py`` does)."""
    if not (folder / "config.json").exists():
        import diffusers

        with torch.device("cuda"):
            net = diffusers.ControlNetModel(**_clean(architectures()["controlnet_sd15"]["controlnet"]))
        fill_random(net, 7)
        net.half().save_pretrained(folder)
    return folder


def control_image() -> Any:
    from PIL import Image

    return Image.fromarray((torch.rand(512, 512, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())


def load(folder: Path, names: list[str], controlnet: Path | None) -> Any:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    extra = {}
    if controlnet is not None:
        from gesso_controlnet.model import ControlNetModel

        extra["controlnet"] = ControlNetModel.from_pretrained(controlnet, torch_dtype=torch.float16, device_map="cuda")
    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda", **extra)
    optimize(pipeline, names)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def timed_image(pipeline: Any, extra: dict[str, Any]) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="pt", **extra).images
    torch.cuda.synchronize()
    return time.perf_counter() - start, image


@torch.no_grad()
def probe(family: str, root: Path, name: str) -> dict[str, Any]:
    base = {"controlnet": "sd15", "kandinsky": "kandinsky22"}.get(family, family)
    folder = existing_or_written(base, root / base)
    controlnet = controlnet_folder(root / "controlnet_sd15") if family == "controlnet" else None
    extra = {"image": control_image()} if controlnet is not None else {}
    pipelines = {way: load(folder, names, controlnet) for way, names in ways(name, family).items()}
    result: dict[str, Any] = {"step_ms": {way: [] for way in pipelines}, "image_s": {way: [] for way in pipelines}}
    images: dict[str, torch.Tensor] = {}
    for round_ in range(2 if family == "kandinsky" else 5):
        for way, pipeline in pipelines.items():
            seconds, images[way] = timed_image(pipeline, extra)
            if round_:  # the first round compiles and captures
                result["image_s"][way].append(seconds)
    control = torch.rand(2, 3, 512, 512, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(0))
    result["step"] = "the UNet's call" if controlnet is None else "the ControlNet's and the UNet's, through the conditioner"
    for _ in range(3):
        for way, pipeline in pipelines.items():
            args, kwargs = unet_inputs(pipeline.unet, base)
            if controlnet is None:
                step = lambda p=pipeline, a=args, k=kwargs: p.unet(*a, **k)  # noqa: E731
            else:
                step = controlnet_step(pipeline, *args, kwargs["encoder_hidden_states"], control)
            result["step_ms"][way].append(round(cuda_median_ms(step), 3))
    result["image_s"] = {way: round(statistics.median(t), 4) for way, t in result["image_s"].items()}
    first, second = images.values()
    result["largest image difference"] = float((first.float() - second.float()).abs().max())
    result["held GiB"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    del pipelines
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimization", default="fuse_time_projections", help="the optimization measured")
    parser.add_argument(
        "--families", nargs="+", default=["sd15", "sdxl", "controlnet"], choices=["sd15", "sdxl", "controlnet", "kandinsky"]
    )
    args = parser.parse_args()
    if args.optimization == "cudnn_benchmark":  # both ways in one process would run the same algorithms
        parser.error(
            "cudnn_benchmark cannot be compared within one process (PyTorch keeps the first algorithm chosen for a shape); "
            "time each way in a process of its own: benchmarks/profile_step.py --time --optimizations ... [cudnn_benchmark]"
        )
    root = Path(tempfile.gettempdir()) / "gesso-bench"
    for family in args.families:  # one line each, as soon as it is measured
        print(json.dumps({family: probe(family, root, args.optimization)}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
