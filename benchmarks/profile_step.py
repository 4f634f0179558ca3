"""Where a UNet step's GPU time goes: the top kernels of one step, by total CUDA time.

    python benchmarks/profile_step.py FOLDER [optimization ...]

Run without ``cuda_graph`` (a replayed graph hides its kernels from the profiler).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch


def category(name: str) -> str:
    lowered = name.lower()
    # Inductor's kernels first: their names list the fused ops, and "convolution" there is a bias add
    for key, label in (
        ("triton_mm", "GEMM"),
        ("triton", "fused element-wise / norm (Inductor)"),
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


def main() -> None:
    from gesso import AutoPipelineForText2Image
    from gesso.runner import optimize
    from torch.profiler import ProfilerActivity, profile

    folder, names = sys.argv[1], sys.argv[2:]
    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
    optimize(pipeline, names)
    sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    hidden = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    t = torch.tensor(500.0, device="cuda")
    with torch.no_grad():
        for _ in range(5):
            pipeline.unet(sample, t, hidden)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                pipeline.unet(sample, t, hidden)
            torch.cuda.synchronize()

    def device_us(event: object) -> float:
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)

    events = [e for e in prof.key_averages() if device_us(e) > 0]
    total = sum(device_us(e) for e in events) / 10 / 1000
    by_category: dict[str, float] = defaultdict(float)
    for e in events:
        by_category[category(e.key)] += device_us(e) / 10 / 1000
    print(f"GPU time per step: {total:.2f} ms ({'+'.join(names) or 'eager'})")
    for label, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {ms:6.2f} ms  {100 * ms / total:5.1f}%")
    print("  top kernels:")
    for e in sorted(events, key=lambda e: -device_us(e))[:12]:
        print(f"  {device_us(e) / 10 / 1000:6.3f} ms x{e.count // 10:<4d} {e.key[:100]}")


if __name__ == "__main__":
    main()
