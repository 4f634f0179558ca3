"""GPU benchmark: gesso against the reference library on the same GPU, in the same run.

    python benchmarks/run.py --families sd15 sdxl --out benchmarks/results

For each family it writes a full-size random-weight checkpoint (``checkpoints.py``), loads it
through each library's normal loading path, and measures, in float16 with classifier-free
guidance: the UNet step at batch 2 for each optimization variant (median of CUDA-event timings
after warm-up; compile time reported apart), the end-to-end warm generation, the warm load
time and the peak GPU memory. Prints a table with ratios; writes ``results.json`` and a chart.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import architectures, write_family, write_kandinsky  # noqa: E402
from gesso.optimize import PRESETS  # noqa: E402

SIZES = {"sd15": 512, "sdxl": 1024}
COMPONENTS = ("kandinsky22", "controlnet_sd15")
COMPONENT_SIZES = {"kandinsky22": 768, "controlnet_sd15": 512}
STEPS = {"sd15": 50, "sdxl": 30, "kandinsky22": 100}  # Kandinsky: its decoder's default (and 25 prior steps)
#: name -> (optimizations, environment for the compile step); the ``fast`` variants name the preset,
#: so they follow it (and take the installed plugins' members) as a user's ``optimizations=[fast]`` does.
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "eager": ([], {}),
    "fused+NHWC": (["fuse_qkv", "channels_last"], {}),
    "fused+NHWC+graph": (["fuse_qkv", "channels_last", "cuda_graph"], {}),
    "fast": (["fast"], {}),
    "fast, full-UNet compile": ([("compile_full" if name == "compile" else name) for name in PRESETS["fast"]], {}),
    "fast + compiled VAE": (["fast", "compile_vae"], {}),
    "fast, max-autotune": (["fast"], {"GESSO_COMPILE_MODE": "max-autotune-no-cudagraphs"}),
}


def cuda_median_ms(fn: Any, warmup_s: float = 1.0, repeat: int = 30) -> float:
    """Median of CUDA-event timings, after at least ``warmup_s`` of calls (clocks ramp up from idle)."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def unet_inputs(unet: Any, family: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One classifier-free-guidance step's inputs (batch 2) at the family's size; ``kandinsky22``:
    the decoder UNet at 768x768, conditioned on an image embedding."""
    size = (COMPONENT_SIZES[family] if family in COMPONENT_SIZES else SIZES[family]) // 8
    generator = torch.Generator("cuda").manual_seed(0)
    sample = torch.randn(2, 4, size, size, device="cuda", dtype=torch.float16, generator=generator)
    if family == "kandinsky22":
        image = torch.randn(2, unet.config.encoder_hid_dim, device="cuda", dtype=torch.float16, generator=generator)
        return (sample, torch.tensor(500.0, device="cuda")), {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image}}
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16, generator=generator)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=generator),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2, device="cuda", dtype=torch.float16),
        }
    return (sample, torch.tensor(500.0, device="cuda")), kwargs


def fresh_dir(path: Path) -> str:
    """``path``, emptied."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return str(path)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def load_gesso(folder: Path, optimizations: list[str]) -> tuple[Any, float]:
    """Load onto the GPU straight from the files (``device_map``); ``load_time.py`` also times ``.to``."""
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    start = time.perf_counter()
    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    optimize(pipeline, optimizations)
    return pipeline, load_s


def load_reference(folder: Path) -> tuple[Any, float]:
    import diffusers

    start = time.perf_counter()
    pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
    torch.cuda.synchronize()
    return pipeline, time.perf_counter() - start


def attention_kernels(unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Names of the attention kernels that actually run (read off the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        unet(*args, **kwargs)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(s in e.key.lower() for s in ("flash", "fmha", "attention", "cudnn_sdpa", "sdpa"))}
    return sorted(n[:90] for n in names)


def with_scheduler(pipeline: Any, name: str | None) -> Any:
    """The pipeline with another scheduler of its own library (by class name), set up from the
    checkpoint's scheduler config, as users switch them; ``None`` keeps the checkpoint's."""
    if name is not None:
        library = importlib.import_module("diffusers" if type(pipeline).__module__.startswith("diffusers") else "gesso.schedulers")
        pipeline.scheduler = getattr(library, name).from_config(pipeline.scheduler.config)
    return pipeline


def end_to_end(pipeline: Any, family: str, repeat: int = 3, **extra: Any) -> tuple[float, float]:
    """Warm seconds for one image (text encoding + steps + decode) and the peak GiB of GPU memory
    held: the caching allocator's reserved memory, from an emptied cache through the warm-up and the
    timed images. Allocated bytes would miss what CUDA graphs use: their pools are reserved at
    capture, and a replay allocates nothing."""
    kwargs = {"prompt": "an astronaut in a jungle, cold color palette", "num_inference_steps": STEPS[family], "output_type": "pil", **extra}
    pipeline.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipeline(**kwargs, generator=torch.Generator("cpu").manual_seed(0))  # warm-up (and capture)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        pipeline(**kwargs, generator=torch.Generator("cpu").manual_seed(0))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_reserved() / 2**30


@torch.no_grad()
def bench_family(
    family: str,
    root: Path,
    variants: list[str],
    end_to_end_variants: list[str],
    cold_start: list[str] | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    folder = write_family(family, root / family)
    free()
    result: dict[str, Any] = {
        "family": family,
        "size": SIZES[family],
        "steps": STEPS[family],
        "unet_ms": {},
        "compile_s": {},
        "e2e_s": {},
        "peak_gib": {},
        "load_s": {},
        "scheduler": scheduler or "the checkpoint's",
    }

    reference, _ = load_reference(folder)
    reference, result["load_s"]["reference"] = load_reference(folder)  # warm (page cache)
    args, kwargs = unet_inputs(reference.unet, family)
    result["unet_ms"]["reference eager"] = cuda_median_ms(lambda: reference.unet(*args, **kwargs))
    print(f"[{family}] reference eager: {result['unet_ms']['reference eager']:.2f} ms/step", flush=True)
    result["attention_kernels_reference"] = attention_kernels(reference.unet, args, kwargs)
    result["e2e_s"]["reference eager"], result["peak_gib"]["reference eager"] = end_to_end(with_scheduler(reference, scheduler), family)
    reference = None  # free its GPU memory before the next variant
    free()

    for name, (optimizations, environment) in VARIANTS.items():
        if name not in variants:
            continue
        # an empty compile cache per variant: its "compile s" is what a first run waits
        environment = {**environment, "GESSO_COMPILE_CACHE": fresh_dir(root / "compile-caches" / family / name)}
        saved = {k: os.environ.get(k) for k in environment}
        os.environ.update(environment)
        try:
            measure_variant(result, folder, family, name, optimizations, end_to_end_variants, scheduler)
        except Exception as err:  # one broken variant must not lose the others' numbers
            traceback.print_exc()
            result.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
            torch._dynamo.reset()
        free()
    _, result["load_s"]["gesso"] = load_gesso(folder, [])
    free()
    if cold_start:
        result["first_image_s"] = first_image_times(folder, root / "compile-caches", STEPS[family], cold_start)
    return result


#: Start-up variants timed by ``--cold-start``: label -> (optimizations, environment).
START_UP: dict[str, tuple[list[str], dict[str, str]]] = {
    "fast": (["fast"], {}),
    "fast, blocks traced in each process": (["fast"], {"GESSO_COMPILE_CACHE": "off"}),
}


def first_image_times(folder: Path, caches: Path, steps: int, labels: list[str]) -> dict[str, Any]:
    """New process to first image: with empty compile caches, then with the caches it left."""
    import subprocess

    script = Path(__file__).resolve().parent / "first_image.py"
    times: dict[str, Any] = {}
    for label in labels:
        optimizations, environment = START_UP[label]
        cache = caches / label.replace(", ", "-").replace(" ", "-")
        fresh_dir(cache)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "GESSO_COMPILE_CACHE": str(cache / "gesso"), **environment}
        # Python bytecode kept as after a normal install (the device image ships torch without it,
        # and recompiling torch's sources costs about 7 s a process): the first run writes it.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(caches / "bytecode")
        for state in ("empty cache", "warm cache", "warm cache again"):
            command = [sys.executable, "-X", "faulthandler", str(script), str(folder), str(steps), *optimizations]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"first image, {label}, {state} failed ({done.returncode}):\n{done.stderr[-3000:]}", flush=True)
                break
            times[f"{label}, {state}"] = json.loads(done.stdout.strip().splitlines()[-1])
            times[f"{label}, {state}"]["process_s"] = time.perf_counter() - start  # what a CLI user waits, exit included
            print(f"first image, {label}, {state}: {times[f'{label}, {state}']}", flush=True)
    return times


def measure_variant(
    result: dict[str, Any],
    folder: Path,
    family: str,
    name: str,
    optimizations: list[str],
    end_to_end_variants: list[str],
    scheduler: str | None = None,
) -> None:
    pipeline, load_s = load_gesso(folder, optimizations)
    result["load_s"].setdefault("gesso", load_s)
    args, kwargs = unet_inputs(pipeline.unet, family)
    start = time.perf_counter()
    pipeline.unet(*args, **kwargs)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    step_ms = cuda_median_ms(lambda: pipeline.unet(*args, **kwargs))
    result["unet_ms"][f"gesso {name}"] = step_ms
    result["compile_s"][f"gesso {name}"] = max(first - step_ms / 1000, 0.0)
    print(f"[{family}] gesso {name}: {step_ms:.2f} ms/step (first call {first:.1f} s)", flush=True)
    if name == "eager":
        result["attention_kernels_gesso"] = attention_kernels(pipeline.unet, args, kwargs)
    if name in end_to_end_variants:
        e2e = end_to_end(with_scheduler(pipeline, scheduler), family)
        result["e2e_s"][f"gesso {name}"], result["peak_gib"][f"gesso {name}"] = e2e
    pipeline = None  # free its GPU memory before the next variant


def fast_members(family: str, policy: Any) -> list[str]:
    """``fast``'s members that apply to ``family`` on a CUDA device, as ``optimize`` expands the preset
    under ``policy`` (the plugins' members and the policy's ``preset_members`` included)."""
    from gesso.config import presets
    from gesso.plugins import get_host

    registry = get_host().registry
    return [n for n in presets(registry, policy)["fast"] if registry.optimizations[n].supports(family, "cuda") is None]


class PipelineStandIn(SimpleNamespace):
    """The pipeline attributes a conditioner and the optimizations read (weak-referenceable, unlike SimpleNamespace)."""


def controlnet_step(holder: Any, sample: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, control: torch.Tensor) -> Any:
    """One ControlNet + UNet step as the pipeline makes it: the conditioner's step inputs (the net's
    residuals, or, under ``controlnet_side_stream``, its call for the UNet to make), then the UNet's call."""
    from gesso_controlnet.conditioner import ControlNetConditioner

    conditioner = next(c for c in holder.conditioners if isinstance(c, ControlNetConditioner))
    state = SimpleNamespace(images=control, scale=1.0, starts=[0.0], ends=[1.0], guess_mode=False, split=False)
    call, conditioning = SimpleNamespace(controlnet_state=state), SimpleNamespace(encoder_hidden_states=hidden, added_cond_kwargs=None)

    def step() -> Any:
        extra = conditioner.step_inputs(holder, call, 0, t, sample, conditioning)
        return holder.unet(sample, t, hidden, return_dict=False, **extra)

    return step


@torch.no_grad()
def bench_component(name: str) -> dict[str, Any]:
    """Denoiser step of a family whose pipeline is not timed here: the reference module built from
    the published config with random weights, gesso's modules loaded anew for each variant with the
    same state dict. For the ControlNet, gesso's step goes through the conditioner as in a pipeline."""
    import diffusers
    from checkpoints import _clean, fill_random
    from gesso.contract import ExecutionPolicy
    from gesso.nn import UNet2DConditionModel
    from gesso.plugins import get_host
    from gesso.runner import optimize

    spec = architectures()
    result: dict[str, Any] = {"family": name, "size": COMPONENT_SIZES[name], "unet_ms": {}, "compile_s": {}}
    if name == "kandinsky22":
        import gesso_kandinsky.unet  # noqa: F401  (registers the Kandinsky blocks)

        configs = {"unet": (UNet2DConditionModel, _clean(spec["kandinsky22"]["unet"]))}
        with torch.device("cuda"):
            reference = diffusers.UNet2DConditionModel(**configs["unet"][1])
        fill_random(reference, 0)
        references = {"unet": reference.half()}
        args, kwargs = unet_inputs(reference, name)  # the probes' inputs: the same sample and image embedding
        ref_step = lambda: reference(*args, **kwargs)  # noqa: E731
    else:
        from gesso_controlnet.conditioner import ControlNetConditioner
        from gesso_controlnet.model import ControlNetModel

        configs = {
            "unet": (UNet2DConditionModel, _clean(spec["sd15"]["unet"])),
            "controlnet": (ControlNetModel, _clean(spec["controlnet_sd15"]["controlnet"])),
        }
        with torch.device("cuda"):
            ref_unet = diffusers.UNet2DConditionModel(**configs["unet"][1])
            ref_net = diffusers.ControlNetModel(**configs["controlnet"][1])
        for index, module in enumerate((ref_unet, ref_net)):
            fill_random(module, index)
            module.half()
        references = {"unet": ref_unet, "controlnet": ref_net}
        size = COMPONENT_SIZES[name] // 8
        generator = torch.Generator("cuda").manual_seed(0)
        sample = torch.randn(2, 4, size, size, device="cuda", dtype=torch.float16, generator=generator)
        t = torch.tensor(500.0, device="cuda")
        hidden = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16, generator=generator)
        control = torch.rand(2, 3, 512, 512, device="cuda", dtype=torch.float16, generator=generator)

        def ref_step() -> Any:
            down, mid = ref_net(sample, t, hidden, controlnet_cond=control, return_dict=False)
            return ref_unet(sample, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    result["unet_ms"]["reference eager"] = cuda_median_ms(ref_step)
    print(f"[{name}] reference eager: {result['unet_ms']['reference eager']:.2f} ms/step", flush=True)
    states = {key: module.state_dict() for key, module in references.items()}
    reference = ref_unet = ref_net = references = None  # noqa: F841  (their weights live on in the state dicts)

    family = "kandinsky" if name == "kandinsky22" else "sd15"
    registry = get_host().registry
    members = registry.families[family].execution_policy.preset_members  # what the family adds to fast
    policy = ExecutionPolicy(hot_loop=tuple(configs), preset_members=members)
    variants: dict[str, list[str]] = {"eager": [], "fast": ["fast"]}
    if name == "controlnet_sd15":  # the same run with the net before the UNet, as before controlnet_side_stream
        fast = fast_members(family, policy)
        variants = {"eager": [], "fast, net before the UNet": [n for n in fast if n != "controlnet_side_stream"], "fast": ["fast"]}
    for label, names in variants.items():
        with torch.device("meta"):
            modules = {key: cls.from_config(config) for key, (cls, config) in configs.items()}
        for key, module in modules.items():
            module.load_state_dict({k: v.clone() for k, v in states[key].items()}, assign=True)
        holder = PipelineStandIn(**modules, conditioners=[], num_timesteps=50, family=family)
        if name == "controlnet_sd15":
            holder.conditioners.append(ControlNetConditioner(holder))
            our_step = controlnet_step(holder, sample, t, hidden, control)
        else:
            our_step = lambda holder=holder: holder.unet(*args, **kwargs)  # noqa: E731
        optimize(holder, names, device="cuda", family=family, policy=policy)
        start = time.perf_counter()
        our_step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        result["unet_ms"][f"gesso {label}"] = cuda_median_ms(our_step)
        result["compile_s"][f"gesso {label}"] = first
        print(f"[{name}] gesso {label}: {result['unet_ms'][f'gesso {label}']:.2f} ms/step (first call {first:.1f} s)", flush=True)
        holder = modules = our_step = None  # noqa: F841
        free()
    return result


@torch.no_grad()
def bench_controlnet_end_to_end(root: Path) -> dict[str, Any]:
    """SD1.5 + one ControlNet, 50 steps, one 512x512 image: the reference eager against gesso
    ``fast`` + ``compile_vae``, both loading the same folders through their normal paths."""
    import diffusers
    from checkpoints import _clean, fill_random
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize
    from gesso_controlnet.model import ControlNetModel
    from PIL import Image

    folder, net_folder = write_family("sd15", root / "sd15"), root / "controlnet_sd15"
    with torch.device("cuda"):
        net = diffusers.ControlNetModel(**_clean(architectures()["controlnet_sd15"]["controlnet"]))
    fill_random(net, 7)
    net.half().save_pretrained(net_folder)
    net = None
    free()
    control = Image.fromarray((torch.rand(512, 512, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    result: dict[str, Any] = {"family": "sd15 + ControlNet", "size": 512, "steps": STEPS["sd15"], "e2e_s": {}, "peak_gib": {}}

    ref_net = diffusers.ControlNetModel.from_pretrained(net_folder, torch_dtype=torch.float16)
    reference = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=ref_net, torch_dtype=torch.float16).to(
        "cuda"
    )
    result["e2e_s"]["reference eager"], result["peak_gib"]["reference eager"] = end_to_end(reference, "sd15", image=control)
    reference = ref_net = None
    free()

    our_net = ControlNetModel.from_pretrained(net_folder, torch_dtype=torch.float16, device_map="cuda")
    ours = AutoPipelineForText2Image.from_pretrained(folder, controlnet=our_net, torch_dtype=torch.float16, device_map="cuda")
    optimize(ours, ["fast", "compile_vae"])
    result["e2e_s"]["gesso fast + compiled VAE"], result["peak_gib"]["gesso fast + compiled VAE"] = end_to_end(ours, "sd15", image=control)
    for name, seconds in result["e2e_s"].items():
        print(f"[sd15 + ControlNet] {name}: {seconds:.3f} s end to end, peak held {result['peak_gib'][name]:.2f} GiB", flush=True)
    return result


def median_seconds(function: Any, repeat: int = 3) -> float:
    """Warm seconds of one call (after a first, untimed one), device work included."""
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def bench_kandinsky_end_to_end(root: Path) -> dict[str, Any]:
    """Kandinsky 2.2 as a user runs it: the combined pipeline at its defaults (512x512, 25 prior
    steps, 100 decoder steps), both libraries loading the same folder; the prior alone is timed
    too, as it runs outside the decoder's loop."""
    import diffusers
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize

    folder = write_kandinsky(root / "kandinsky22")
    free()
    result: dict[str, Any] = {"family": "kandinsky22 (combined)", "size": 512, "steps": STEPS["kandinsky22"], "e2e_s": {}, "peak_gib": {}}
    result["prior_s"] = {}
    prompt = "an astronaut in a jungle, cold color palette"

    def prior_seconds(pipeline: Any) -> float:
        prior = pipeline.prior_pipe
        prior.set_progress_bar_config(disable=True)
        return median_seconds(lambda: prior(prompt, generator=torch.Generator("cpu").manual_seed(0)))

    reference = diffusers.AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
    result["e2e_s"]["reference eager"], result["peak_gib"]["reference eager"] = end_to_end(reference, "kandinsky22")
    result["prior_s"]["reference eager"] = prior_seconds(reference)
    reference = None
    free()
    for label, optimizations in (("gesso eager", []), ("gesso fast + compiled VAE", ["fast", "compile_vae"])):
        ours = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
        optimize(ours, optimizations)
        result["e2e_s"][label], result["peak_gib"][label] = end_to_end(ours, "kandinsky22")
        result["prior_s"][label] = prior_seconds(ours)
        ours = None
        free()
    for name, seconds in result["e2e_s"].items():
        print(
            f"[kandinsky22] {name}: {seconds:.3f} s end to end (prior {result['prior_s'][name] * 1000:.1f} ms), "
            f"peak held {result['peak_gib'][name]:.2f} GiB",
            flush=True,
        )
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "unet_ms" not in r:  # an end-to-end-only entry
            ref_e2e = r["e2e_s"]["reference eager"]
            lines.append(f"\n{r['family']} {r['size']}x{r['size']}, float16, end to end, {r['steps']} steps, warm:")
            for name, seconds in r["e2e_s"].items():
                lines.append(f"  {name:40s} {seconds:8.3f} s {ref_e2e / seconds:6.2f}x  peak held {r['peak_gib'][name]:.2f} GiB")
            for name, seconds in r.get("prior_s", {}).items():
                lines.append(f"  prior alone, {name:27s} {seconds * 1000:8.1f} ms")
            continue
        ref = r["unet_ms"]["reference eager"]
        what = "ControlNet + UNet" if r["family"] == "controlnet_sd15" else "UNet"
        lines.append(f"\n{r['family']} {r['size']}x{r['size']}, float16, {what} step at batch 2 (CFG)")
        lines.append(f"  {'variant':40s} {'ms/step':>9s} {'vs ref':>7s} {'compile s':>10s}")
        for name, ms in r["unet_ms"].items():
            lines.append(f"  {name:40s} {ms:9.2f} {ref / ms:6.2f}x {r['compile_s'].get(name, 0.0):10.1f}")
        if "e2e_s" not in r:
            continue
        ref_e2e = r["e2e_s"]["reference eager"]
        scheduler = r.get("scheduler", "the checkpoint's")
        lines.append(f"  end to end, {r['steps']} steps, scheduler: {scheduler}, warm:")
        for name, seconds in r["e2e_s"].items():
            lines.append(f"  {name:40s} {seconds:8.3f} s {ref_e2e / seconds:6.2f}x  peak held {r['peak_gib'][name]:.2f} GiB")
        lines.append(f"  warm load to GPU: reference {r['load_s']['reference']:.2f} s, gesso {r['load_s']['gesso']:.2f} s")
        if "first_image_s" in r:
            lines.append(
                "  new process to first image: " + ", ".join(f"{k} {v['first_image_s']:.1f} s" for k, v in r["first_image_s"].items())
            )
        lines.append(f"  attention kernels: gesso {r.get('attention_kernels_gesso')}; reference {r['attention_kernels_reference']}")
        for name, error in r.get("errors", {}).items():
            lines.append(f"  FAILED {name}: {error}")
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = [r for r in results if "unet_ms" in r]
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        names = list(r["unet_ms"])
        ax.barh(names, [r["unet_ms"][n] for n in names], color=["#999"] + ["#3a7"] * (len(names) - 1))
        ax.set_xlabel("ms per UNet step (batch 2, fp16)")
        ax.set_title(f"{r['family']} {r['size']}x{r['size']}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=["sd15"], choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-bench")
    parser.add_argument("--components", nargs="*", default=[], choices=COMPONENTS, help="denoiser-only timings")
    parser.add_argument(
        "--cold-start",
        nargs="*",
        choices=sorted(START_UP),
        help="also time a new process to its first image (default: every start-up variant)",
    )
    parser.add_argument("--variants", nargs="*", default=[v for v in VARIANTS if "max-autotune" not in v], help="UNet variants to time")
    parser.add_argument("--controlnet-e2e", action="store_true", help="also time SD1.5 + ControlNet end to end")
    parser.add_argument("--kandinsky-e2e", action="store_true", help="also time Kandinsky 2.2 (prior + decoder) end to end")
    parser.add_argument("--e2e", nargs="*", default=["eager", "fast", "fast + compiled VAE"], help="variants also timed end to end")
    parser.add_argument(
        "--scheduler", help="a scheduler class for the families' end-to-end runs, in both libraries (default: the checkpoint's)"
    )
    args = parser.parse_args()
    import diffusers
    import transformers

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "reference_recorded": architectures().get("measured_2026_11_26_h200", {}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["GESSO_COMPILE_CACHE"] = fresh_dir(args.scratch / "compile-caches" / "other")  # first-run compiles
    results: list[dict[str, Any]] = []
    for family in args.families:  # saved after each family, so a time-out keeps what was measured
        results.append(
            bench_family(
                family,
                args.scratch,
                args.variants,
                args.e2e,
                None if args.cold_start is None else args.cold_start or list(START_UP),
                args.scheduler,
            )
        )
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        chart(results, args.out / "unet_step.png")
    for component in args.components:
        try:
            results.append(bench_component(component))
        except Exception as err:
            results.append(
                {
                    "family": component,
                    "size": COMPONENT_SIZES[component],
                    "unet_ms": {"reference eager": float("nan")},
                    "compile_s": {},
                    "errors": {"all": f"{type(err).__name__}: {err}"[:300]},
                }
            )
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        chart(results, args.out / "unet_step.png")
    for wanted, bench in ((args.controlnet_e2e, bench_controlnet_end_to_end), (args.kandinsky_e2e, bench_kandinsky_end_to_end)):
        if wanted:
            results.append(bench(args.scratch))
            (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"{meta['gpu']}, torch {meta['torch']}, diffusers {meta['diffusers']} (reference), {meta['date']}")
    print(table(results))


if __name__ == "__main__":
    main()
