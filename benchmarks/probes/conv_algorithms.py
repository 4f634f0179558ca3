"""Probe: every convolution shape of a model under cuDNN's own pick, its timed pick among the first
ten candidates (PyTorch's default ``torch.backends.cudnn.benchmark_limit``), and among all of them.

    python benchmarks/probes/conv_algorithms.py --model kandinsky22 [--out FILE]
    python benchmarks/probes/conv_algorithms.py --model sdxl-vae --collect-only   # the shapes only, any machine

Models: the denoisers at their benchmark sizes (float16, batch 2, as ``profile_step.py`` builds
them) and the VAE decoders an image runs once (``sd15-vae`` in float16 at 512², ``sdxl-vae`` in
float32 at 1024², as SDXL's ``force_upcast`` runs it). The shapes are collected on the meta device
by forward hooks on every ``Conv2d``. PyTorch keeps the algorithm first chosen for a shape for the
rest of the process, whichever way it was chosen, so each setting is timed in a child process of
its own. Each shape is timed alone, channels-last, 20 calls replayed from a CUDA graph (L2 warm, as
in a step; ``layer_norm.graph_time``); the sums weight each shape by how often the model calls it.
Shapes timed alone can favour other algorithms than the step does (SD1.5's timed picks were faster
alone and slower in its step, ``benchmarks/NOTES.md``, fifteenth session): confirm a gain in the step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from checkpoints import _clean, architectures  # noqa: E402

#: model -> (architecture entry, component, latent size, dtype name)
MODELS = {
    "sd15": ("sd15", "unet", 64, "float16"),
    "sdxl": ("sdxl", "unet", 128, "float16"),
    "kandinsky22": ("kandinsky22", "unet", 96, "float16"),
    "sd15-vae": ("sd15", "vae", 64, "float16"),
    "sdxl-vae": ("sdxl", "vae", 128, "float32"),
}
#: setting -> (cudnn.benchmark, benchmark_limit)
SETTINGS = {"cuDNN's pick": (False, 10), "timed, first 10": (True, 10), "timed, all": (True, 0)}


def collect(model: str) -> list[dict[str, Any]]:
    """The model's convolutions: one entry per distinct configuration, with its number of calls."""
    entry, component, size, _ = MODELS[model]
    config = _clean(architectures()[entry][component])
    seen: Counter[str] = Counter()

    def note(module: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        key = {
            "input": list(inputs[0].shape),
            "weight": list(module.weight.shape),
            "stride": list(module.stride),
            "padding": list(module.padding),
            "groups": module.groups,
            "bias": module.bias is not None,
        }
        seen[json.dumps(key)] += 1

    with torch.device("meta"), torch.no_grad():
        if component == "vae":
            from gesso.nn import AutoencoderKL

            vae = AutoencoderKL.from_config(config)
            hooks = [m.register_forward_hook(note) for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
            vae.decoder(torch.randn(1, config.get("latent_channels", 4), size, size))
        else:
            from gesso.nn import UNet2DConditionModel

            if model == "kandinsky22":
                import gesso_kandinsky.unet  # noqa: F401  (registers the Kandinsky blocks)
            unet = UNet2DConditionModel.from_config(config)
            hooks = [m.register_forward_hook(note) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
            sample = torch.randn(2, 4, size, size)
            if model == "kandinsky22":
                unet(sample, torch.tensor(500.0), None, added_cond_kwargs={"image_embeds": torch.randn(2, 1280)})
            else:
                added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)} if model == "sdxl" else None
                unet(sample, torch.tensor(500.0), torch.randn(2, 77, config["cross_attention_dim"]), added_cond_kwargs=added)
        for hook in hooks:
            hook.remove()
    return [{**json.loads(key), "calls": calls} for key, calls in seen.most_common()]


def time_shapes(shapes: list[dict[str, Any]], dtype: torch.dtype, benchmark: bool, limit: int) -> list[float]:
    """Microseconds a call of each shape, in this process, with the given cuDNN setting."""
    from layer_norm import graph_time

    torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = benchmark, limit
    generator = torch.Generator("cuda").manual_seed(0)
    times = []
    for shape in shapes:
        x = torch.randn(shape["input"], device="cuda", generator=generator).to(dtype).to(memory_format=torch.channels_last)
        w = torch.randn(shape["weight"], device="cuda", generator=generator).to(dtype).to(memory_format=torch.channels_last)
        b = torch.randn(shape["weight"][0], device="cuda", generator=generator).to(dtype) if shape["bias"] else None

        def call(x: torch.Tensor = x, w: torch.Tensor = w, b: torch.Tensor | None = b, s: dict[str, Any] = shape) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, w, b, s["stride"], s["padding"], 1, s["groups"])

        times.append(graph_time(call))  # the warm-up calls choose the algorithm, before the capture
    return times


def flops(shape: dict[str, Any]) -> float:
    n, _, h, w = shape["input"]
    out_h = (h + 2 * shape["padding"][0] - shape["weight"][2]) // shape["stride"][0] + 1
    out_w = (w + 2 * shape["padding"][1] - shape["weight"][3]) // shape["stride"][1] + 1
    k, c, r, s = shape["weight"]
    return 2.0 * n * out_h * out_w * k * c * r * s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="kandinsky22")
    parser.add_argument("--collect-only", action="store_true", help="print the shapes and stop")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--child", nargs=2, metavar=("SHAPES", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, MODELS[args.model][3])
    if args.child:  # one setting, in a process of its own
        shapes = json.loads(Path(args.child[0]).read_text())
        print(json.dumps(time_shapes(shapes, dtype, *SETTINGS[args.child[1]])))
        return
    shapes = collect(args.model)
    total = sum(flops(s) * s["calls"] for s in shapes)
    print(f"{args.model}: {len(shapes)} shapes, {sum(s['calls'] for s in shapes)} calls, {total / 1e12:.2f} TFLOP", flush=True)
    if args.collect_only:
        for s in shapes:
            print(f"  x{s['calls']:<3d} {s['input']} * {s['weight']} stride {s['stride']}")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(shapes, file)
    results: dict[str, list[float]] = {}
    for setting in SETTINGS:
        child = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--child", file.name, setting]
        results[setting] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"  {'calls':>5s} {'input':24s} {'weight':22s} " + " ".join(f"{name:>16s}" for name in SETTINGS) + "  (µs a call)")
    for index, s in enumerate(shapes):
        row = " ".join(f"{results[name][index]:16.1f}" for name in SETTINGS)
        print(f"  {s['calls']:5d} {str(s['input']):24s} {str(s['weight']):22s} {row}")
    sums = {name: sum(t * s["calls"] for t, s in zip(times, shapes)) / 1000 for name, times in results.items()}
    print("  all calls: " + ", ".join(f"{name} {ms:.2f} ms ({total / ms / 1e9:.0f} TFLOP/s)" for name, ms in sums.items()))
    if args.out:
        args.out.write_text(
            json.dumps({"model": args.model, "torch": torch.__version__, "shapes": shapes, "us": results, "ms": sums}, indent=1)
        )


if __name__ == "__main__":
    main()
