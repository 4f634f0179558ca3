"""Where a denoiser step's GPU time goes: kernels by class, the heaviest kernels, the matrix
products, convolutions and attentions by shape, and one step's kernels in launch order.

    python benchmarks/profile_step.py --family sdxl [--optimizations fuse_qkv fuse_time_projections channels_last compile] [--out DIR] [--time]

The denoiser is built from the published config with random weights (no checkpoint needed) and
run in float16 at batch 2 (classifier-free guidance). Run without ``cuda_graph``: a replayed graph
hides its kernels from the profiler. With ``--out`` it also writes ``profile-FAMILY.json``; with
``--time`` it then captures the step in a CUDA graph and times it (median of CUDA-event timings).
``--inductor-defaults`` compiles with Inductor's own heuristics instead of gesso's
(``gesso.optimize.heuristics``), in this process (compile workers would apply gesso's); give each
run its own ``TORCHINDUCTOR_CACHE_DIR`` to compare them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import _clean, architectures, fill_random  # noqa: E402
from run import PipelineStandIn, controlnet_step, cuda_median_ms, unet_inputs  # noqa: E402

SIZES = {"sd15": 512, "sdxl": 1024, "kandinsky22": 768, "controlnet_sd15": 512}
STEPS_PROFILED = 10
#: The operators whose input shapes say which matrix product, convolution or attention a kernel is
#: (the innermost of each nest: ``aten::convolution`` wraps ``aten::cudnn_convolution``, and so on).
SHAPED_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::cudnn_convolution",
    "aten::_cudnn_attention_forward",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
)


def category(name: str) -> str:
    lowered = name.lower()
    # Inductor's kernels first: their names list the fused ops, and "convolution" there is a bias add
    for key, label in (
        ("triton_mm", "GEMM"),
        ("layer_norm", "layer norm (Inductor)"),
        ("group_norm", "group norm (Inductor)"),
        ("triton", "fused element-wise (Inductor)"),
        ("sdpa", "attention"),
        ("fmha", "attention"),
        ("flash", "attention"),
        ("conv", "convolution"),
        ("xmma", "convolution/GEMM (cuDNN)"),
        ("gemm", "GEMM"),
        ("nvjet", "GEMM"),
        ("norm", "norm"),
    ):
        if key in lowered:
            return label
    return "other"


def build(family: str) -> tuple[Any, Any, str]:
    """A pipeline stand-in holding the family's hot-loop modules on the GPU in float16 (their names in
    ``holder.hot_loop``; a ControlNet comes with its conditioner, as in a pipeline), a function running
    one step, and the family's plugin name."""
    from gesso.nn import UNet2DConditionModel

    spec = architectures()
    unet_family = "sd15" if family == "controlnet_sd15" else family
    if family == "kandinsky22":
        import gesso_kandinsky.unet  # noqa: F401  (registers the Kandinsky blocks)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(_clean(spec[unet_family]["unet"]))
    fill_random(unet, 0)
    plugin_family = "kandinsky" if family == "kandinsky22" else unet_family
    holder = PipelineStandIn(unet=unet.half(), hot_loop=("unet",), conditioners=[], num_timesteps=50, family=plugin_family)
    if family == "kandinsky22":  # conditioned on an image embedding, not on text
        generator = torch.Generator("cuda").manual_seed(0)
        size = SIZES[family] // 8
        args = (torch.randn(2, 4, size, size, device="cuda", dtype=torch.float16, generator=generator), torch.tensor(500.0, device="cuda"))
        image = torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=generator)
        kwargs: dict[str, Any] = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image}}
    else:
        args, kwargs = unet_inputs(unet, unet_family)
    if family == "controlnet_sd15":  # through the conditioner, so that controlnet_side_stream applies as in a pipeline
        from gesso_controlnet.conditioner import ControlNetConditioner
        from gesso_controlnet.model import ControlNetModel

        with torch.device("cuda"):
            net = ControlNetModel.from_config(_clean(spec["controlnet_sd15"]["controlnet"]))
        fill_random(net, 1)
        holder.controlnet, holder.hot_loop = net.half(), ("unet", "controlnet")
        holder.conditioners.append(ControlNetConditioner(holder))
        control = torch.rand(2, 3, SIZES[family], SIZES[family], device="cuda", dtype=torch.float16)
        sample, t = args
        return holder, controlnet_step(holder, sample, t, kwargs["encoder_hidden_states"], control), plugin_family
    return holder, lambda: holder.unet(*args, **kwargs), plugin_family


def is_kernel(event: Any) -> bool:
    """A kernel that ran on the GPU: not a CPU record, and not the record Inductor puts around a
    compiled graph's kernels (counting it would count them twice)."""
    return event.device_type == torch.autograd.DeviceType.CUDA and "CompiledFxGraph" not in event.key


def device_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)


def profile_family(family: str, optimizations: list[str], out: Path | None, time_step: bool = False) -> dict[str, Any]:
    from gesso.contract import ExecutionPolicy
    from gesso.runner import optimize
    from torch.profiler import ProfilerActivity, profile

    holder, step, plugin_family = build(family)
    policy = ExecutionPolicy(hot_loop=holder.hot_loop)
    optimize(holder, optimizations, device="cuda", family=plugin_family, policy=policy)
    with torch.no_grad():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(STEPS_PROFILED):
                step()
            torch.cuda.synchronize()

    averages = prof.key_averages()
    kernels = [e for e in averages if device_us(e) > 0 and is_kernel(e)]
    total = sum(device_us(e) for e in kernels) / STEPS_PROFILED / 1000
    by_category: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_category[category(e.key)] += device_us(e) / STEPS_PROFILED / 1000
    top = sorted(kernels, key=lambda e: -device_us(e))[:40]
    # aten ops with their input shapes: which matrix products / convolutions / attentions cost what
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in SHAPED_OPS and e.device_time_total > 0]
    shaped.sort(key=lambda e: -e.device_time_total)
    ordered = [
        {
            "name": e.name[:120],
            "us": round(e.time_range.elapsed_us(), 2),
        }
        for e in prof.events()
        if is_kernel(e)
    ]
    one_step = ordered[: len(ordered) // STEPS_PROFILED]
    report: dict[str, Any] = {
        "family": family,
        "optimizations": optimizations,
        "gpu_ms_per_step": total,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,  # weights, activations and any workspace cuDNN tried
        "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": e.key[:160], "ms": device_us(e) / STEPS_PROFILED / 1000, "calls": e.count // STEPS_PROFILED} for e in top],
        "ops_by_shape": [
            {
                "op": e.key,
                "shapes": str(e.input_shapes)[:200],
                "ms": e.device_time_total / STEPS_PROFILED / 1000,
                "calls": e.count // STEPS_PROFILED,
            }
            for e in shaped[:60]
        ],
        "one_step_kernels": one_step,
    }
    print(
        f"\n== {family} ({'+'.join(optimizations) or 'eager'}): GPU time per step {total:.2f} ms, {len(one_step)} kernels, "
        f"peak {report['peak_gib']:.2f} GiB"
    )
    for label, ms in report["by_category_ms"].items():
        print(f"  {label:40s} {ms:6.2f} ms  {100 * ms / total:5.1f}%")
    print("  top kernels:")
    for k in report["top_kernels"][:25]:
        print(f"  {k['ms']:6.3f} ms x{k['calls']:<4d} {k['name'][:110]}")
    print("  ops by input shape:")
    for k in report["ops_by_shape"][:25]:
        print(f"  {k['ms']:6.3f} ms x{k['calls']:<4d} {k['op'][:40]:40s} {k['shapes'][:110]}")
    if time_step:
        optimize(holder, ["cuda_graph"], device="cuda", family=plugin_family, policy=policy)
        with torch.no_grad():
            report["graph_step_ms"] = [cuda_median_ms(step) for _ in range(3)]
        print(f"  step in a CUDA graph: {', '.join(f'{ms:.3f}' for ms in report['graph_step_ms'])} ms")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from gesso.optimize import heuristics

        suffix = "" if heuristics.ENABLED else "-inductor-defaults"
        (out / f"profile-{family}{suffix}.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sd15"], choices=sorted(SIZES))
    parser.add_argument("--optimizations", nargs="*", default=["fuse_qkv", "fuse_time_projections", "channels_last", "compile"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--time", action="store_true", help="also time the step in a CUDA graph")
    parser.add_argument("--inductor-defaults", action="store_true", help="compile with Inductor's own heuristics")
    args = parser.parse_args()
    if args.inductor_defaults:
        from gesso.optimize import heuristics

        heuristics.ENABLED = False
        os.environ["GESSO_COMPILE_WORKERS"] = "1"
    for family in args.family:
        try:
            profile_family(family, args.optimizations, args.out, args.time)
        except Exception:  # one family's failure must not lose the others' profiles
            traceback.print_exc()
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
