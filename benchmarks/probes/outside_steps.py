"""Probe: the work of an image outside its denoising steps (prompt encoding, VAE decode).

    python benchmarks/probes/outside_steps.py --families sd15 sdxl

For each family (full-size random weights, `fast` + `compile_vae`): prompt encoding eager and with
the text encoders replayed from CUDA graphs (and whether the embeddings are identical); the VAE
decode as the pipeline runs it, its kernels by class, and the decode with the decoder replayed from
a CUDA graph. Prints one JSON line per family.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import write_family  # noqa: E402
from profile_step import category, device_us, is_kernel  # noqa: E402

PROMPT = "an astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def wall_ms(function: Any, repeat: int = 10) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def kernels_by_class(function: Any) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    function()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    classes: dict[str, float] = collections.defaultdict(float)
    kernels: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    count = 0
    for event in prof.events():
        if is_kernel(event):
            classes[category(event.name)] += device_us(event) / 1000
            kernels[event.name[:110]] += device_us(event) / 1000
            calls[event.name[:110]] += 1
            count += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:16]
    return {
        "gpu_ms": round(sum(classes.values()), 3),
        "kernels": count,
        "by_class_ms": {k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top": [(name, round(ms, 3), calls[name]) for name, ms in top],
    }


@torch.no_grad()
def probe(family: str, folder: Path) -> dict[str, Any]:
    from gesso import AutoPipelineForText2Image
    from gesso.optimize.cuda_graph import GraphedForward
    from gesso.runner import optimize

    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cuda")
    optimize(pipeline, ["fast", "compile_vae"])
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.unet.config.sample_size
    pipeline(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0))
    result: dict[str, Any] = {"family": family}

    device = torch.device("cuda")

    def encode() -> Any:
        return pipeline.encode_prompt(PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)

    eager_embeds = encode()
    result["encode_eager_ms"] = wall_ms(encode)
    result["encode_kernels"] = kernels_by_class(encode)
    encoders = [getattr(pipeline, name, None) for name in ("text_encoder", "text_encoder_2")]
    for encoder in encoders:
        if encoder is not None:
            encoder.forward = GraphedForward(encoder.forward)
    graphed_embeds = encode()
    result["encode_graphed_ms"] = wall_ms(encode)
    result["encode_graphed_identical"] = all(
        torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(eager_embeds), torch.utils._pytree.tree_leaves(graphed_embeds))
    )

    latents = torch.randn(1, 4, size, size, device=device, dtype=torch.float16, generator=torch.Generator(device).manual_seed(0))

    def decode() -> Any:
        return pipeline.decode(latents, None)

    eager_image = decode()
    result["decode_ms"] = wall_ms(decode, repeat=5)
    result["decode_kernels"] = kernels_by_class(decode)
    vae = pipeline.vae
    upcast = bool(getattr(vae.config, "force_upcast", False)) and family == "sdxl"
    if upcast:  # the float32 decode without the per-image casts of the weights
        vae.to(torch.float32)
        pipeline.decode = lambda z, call: vae.decode((z / vae.config.scaling_factor).float(), return_dict=False)[0]
        result["decode_kept_float32_ms"] = wall_ms(decode, repeat=5)
    vae.decoder.forward = GraphedForward(vae.decoder.forward)
    graphed_image = decode()
    result["decode_graphed_ms"] = wall_ms(decode, repeat=5)
    result["decode_graphed_max_abs_diff"] = float((graphed_image.float() - eager_image.float()).abs().max())
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if upcast:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            vae.decoder.forward = vae.decoder.forward.forward
            result["decode_float32_no_tf32_ms"] = wall_ms(decode, repeat=3)
    result["tf32_flags"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15"])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gesso-bench")
    args = parser.parse_args()
    for family in args.families:
        print(json.dumps(probe(family, write_family(family, args.scratch / family))), flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
