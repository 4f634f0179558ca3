"""Probe: SDPA backends at the UNets' attention shapes, q/k/v as views of a fused projection.

    python benchmarks/probes/sdpa_backends.py

Each backend timed under a CUDA graph, with its TFLOP/s and its error against float32."""

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_norm import graph_time  # noqa: E402


def main():
    shapes = [
        ("sdxl 64^2", 2, 10, 4096, 64),
        ("sdxl 32^2", 2, 20, 1024, 64),
        ("sd15 64^2", 2, 8, 4096, 40),
        ("sd15 32^2", 2, 8, 1024, 80),
        ("sd15 16^2", 2, 8, 256, 160),
        ("sdxl cross 32^2", 2, 20, 1024, 64, 77),
        ("sdxl cross 64^2", 2, 10, 4096, 64, 77),
        ("sd15 cross 64^2", 2, 8, 4096, 40, 77),
    ]
    for label, B, H, N, D, *kv in shapes:
        Nk = kv[0] if kv else N
        qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.float16)
        q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if kv:
            k, v = (torch.randn(B, H, Nk, D, device="cuda", dtype=torch.float16) for _ in range(2))
        flops = 4 * B * H * N * Nk * D
        row = []
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    t = graph_time(functools.partial(F.scaled_dot_product_attention, q, k, v), calls=10)
                row.append(f"{name[:5]} {t:7.1f} us {flops / t / 1e6:5.0f} TF/s err {err:.1e}")
            except Exception as e:  # noqa: BLE001
                row.append(f"{name[:5]} failed {str(e)[:40]}")
        print(f"{label:16s} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
