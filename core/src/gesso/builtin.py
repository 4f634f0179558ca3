"""The core's own plugin: shared components, the built-in schedulers and optimizations.

It registers through the same hooks as any installed plugin, so third-party packages can do
everything it does. Everything is named by ``"module:attribute"`` and imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable

from gesso.contract import Component, OptimizationSpec, Scheduler
from gesso.hookspecs import hookimpl

#: ``("transformers", name)`` pairs of ``model_index.json`` -> gesso's own class (``gesso.clip``): the
#: same files and outputs, without importing transformers (seconds per process). Other transformers
#: classes load only where a plugin registers them.
TRANSFORMERS_CLASSES = {
    "CLIPTextModel": "CLIPTextModel",
    "CLIPTextModelWithProjection": "CLIPTextModelWithProjection",
    "CLIPVisionModel": "CLIPVisionModel",
    "CLIPVisionModelWithProjection": "CLIPVisionModelWithProjection",
    "CLIPTokenizer": "CLIPTokenizer",
    "CLIPTokenizerFast": "CLIPTokenizer",
    "CLIPImageProcessor": "CLIPImageProcessor",
    "CLIPImageProcessorFast": "CLIPImageProcessor",
    "CLIPImageProcessorPil": "CLIPImageProcessor",
}

SCHEDULER_CLASSES = (
    "PNDMScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LCMScheduler",
    "UnCLIPScheduler",
)


@hookimpl
def register_components(register: Callable[[Component], None]) -> None:
    register(Component("diffusers", "UNet2DConditionModel", "gesso.nn:UNet2DConditionModel"))
    register(Component("diffusers", "AutoencoderKL", "gesso.nn:AutoencoderKL"))
    for name, ours in TRANSFORMERS_CLASSES.items():
        register(Component("transformers", name, f"gesso.clip:{ours}"))
    for name in SCHEDULER_CLASSES:
        register(Component("diffusers", name, f"gesso.schedulers:{name}"))


@hookimpl
def register_schedulers(register: Callable[[Scheduler], None]) -> None:
    from gesso.scheduler_names import SHORT_NAMES

    by_class: dict[str, dict[str, dict]] = {name: {} for name in SCHEDULER_CLASSES}
    for short, (class_name, overrides) in SHORT_NAMES.items():
        by_class[class_name][short] = dict(overrides)
    for name in SCHEDULER_CLASSES:
        register(Scheduler(target=f"gesso.schedulers:{name}", class_name=name, short_names=by_class[name]))


#: name, target, description, devices, order (layout and fusion, then compilation, then graphs).
OPTIMIZATIONS = (
    ("fuse_qkv", "gesso.optimize:fuse_qkv", "one matrix product for q/k/v (self-attention) and k/v (cross-attention)", ("cuda", "cpu"), 10),
    (
        "fuse_time_projections",
        "gesso.optimize:fuse_time_projections",
        "one matrix product a step for the time projections of all the UNet's (and ControlNet's) resnets",
        ("cuda", "cpu"),
        15,
    ),
    ("channels_last", "gesso.optimize:channels_last", "NHWC memory format for the UNet and VAE convolutions", ("cuda", "cpu"), 20),
    ("sdpa_flash", "gesso.optimize:sdpa_flash", "attention through the flash SDPA kernel only", ("cuda", "cpu"), 30),
    ("sdpa_cudnn", "gesso.optimize:sdpa_cudnn", "attention through the cuDNN SDPA kernel only", ("cuda",), 30),
    ("sdpa_efficient", "gesso.optimize:sdpa_efficient", "attention through the memory-efficient SDPA kernel only", ("cuda",), 30),
    (
        "decoder_attention_bf16x3",
        "gesso.optimize.decoder_attention:decoder_attention_bf16x3",
        "a float32 image decoder's attention (SDXL's) as bfloat16 tensor-core products in two parts, not IEEE float32",
        ("cuda",),
        35,
    ),
    ("vae_tiling", "gesso.optimize:vae_tiling", "decode large images in overlapping tiles", ("cuda", "cpu"), 40),
    (
        "compile",
        "gesso.optimize.compile:compile_regional",
        "torch.compile of each repeated block of the hot loop (fast first compile)",
        ("cuda", "cpu"),
        60,
    ),
    (
        "compile_aot",
        "gesso.optimize.aot:compile_aot",
        "each hot-loop module compiled ahead of time into an AOTInductor package, which later processes load without the compiler",
        ("cpu",),  # CUDA packages crash torch 2.11's loader in a new process (benchmarks/NOTES.md)
        60,
    ),
    ("compile_full", "gesso.optimize.compile:compile_full", "torch.compile of each hot-loop module as one graph", ("cuda", "cpu"), 61),
    ("compile_vae", "gesso.optimize.compile:compile_vae", "torch.compile of the VAE decoder's blocks", ("cuda", "cpu"), 62),
    (
        "cudnn_benchmark",
        "gesso.optimize:cudnn_benchmark",
        "cuDNN times its convolution algorithms for each shape the hot loop runs, once, and keeps the fastest",
        ("cuda",),
        70,  # inside cuda_graph's warm-up calls: the timing must not happen while a graph is captured
    ),
    (
        "cuda_graph",
        "gesso.optimize.cuda_graph:cuda_graph",
        "replay the denoiser, the text encoders and the VAE decoder from captured CUDA graphs",
        ("cuda",),
        80,
    ),
    (
        "cross_kv_once",
        "gesso.optimize.cross_kv:cross_kv_once",
        "the prompt's cross-attention keys and values computed once per image, not at every step",
        ("cuda", "cpu"),
        85,  # around cuda_graph's replay: it runs before the step, outside the graph
    ),
    (
        "conditioning_once",
        "gesso.optimize.conditioning_once:conditioning_once",
        "the UNet's addition embedding and projected context (SDXL's size ids, Kandinsky's image) computed once per image",
        ("cuda", "cpu"),
        85,
    ),
    (
        "offload",
        "gesso.optimize.offload:model_cpu_offload",
        "keep components in CPU memory, each on the GPU only while it runs",
        ("cuda",),
        90,
    ),
)


#: Keyword options of the optimizations that take some (name -> default); a run config sets them
#: under ``optimization_options.<name>`` (the modes: ``gesso.optimize.compile.MODES``).
OPTIONS = {name: {"mode": "default"} for name in ("compile", "compile_full", "compile_vae")}


@hookimpl
def register_optimizations(register: Callable[[OptimizationSpec], None]) -> None:
    for name, target, description, devices, order in OPTIMIZATIONS:
        spec = OptimizationSpec(
            name=name, apply=target, description=description, devices=devices, order=order, options=OPTIONS.get(name, {})
        )
        register(spec)
