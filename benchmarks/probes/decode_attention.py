"""Probe: SDXL's float32 VAE decoder attention (one head, 16,384 tokens of 512), ways to run it.

    python benchmarks/probes/decode_attention.py [--out FILE]

SDXL decodes in float32 (its published VAE overflows float16). The decoder's convolutions then run
on TF32 tensor cores in both libraries (cuDNN's default), but its mid-block attention goes to SDPA's
memory-efficient kernel in IEEE float32: about 14 ms of a 55 ms decode (``benchmarks/NOTES.md``,
eighth and tenth sessions). TF32 products through cuBLAS would need the process-wide matmul flag,
whose two APIs refuse to be read once mixed. Ways timed here, each on the same inputs:

- ``sdpa``: what runs today;
- ``matmul, ieee``: the products in query chunks, float32 IEEE;
- ``matmul, tf32 flag``: the same with cuBLAS's TF32 (the flag set in this probe only: the yardstick);
- ``cudnn 1x1``: the two products as 1x1 convolutions, which cuDNN runs on TF32 under the one switch
  the decoder's convolutions already follow (``torch.backends.cudnn.allow_tf32``);
- ``bf16x3``: each operand split into a bfloat16 high and low part, three products summed in float32
  (one product over the concatenated parts), if this torch's ``mm`` takes ``out_dtype``;
- ``gesso decoder_attention_bf16x3``: the same as gesso ships it (the key and value parts split once,
  the scale folded into the queries, the weights' parts in two products without concatenating them,
  the softmax and the weights' split in one compiled kernel);
- ``gesso, softmax then split eagerly``: as shipped until 2026-12-03, the float32 weights written,
  then read to split them;
- ``gesso, 64 MiB of scores a chunk``: half the queries a chunk (less scratch, twice the launches).

Then times SDXL's whole float32 decode at 1024x1024 (full-size VAE, random weights, eager) with the
attention as SDPA, as gesso's, and as gesso's with the softmax and split eager.

Prints the median ms of each and its largest error against float64, relative to the output's
largest value; the decoder's inputs are random normal, scaled as a group-normed map would be.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gesso.optimize import decoder_attention
from gesso.optimize.decoder_attention import attention_in_bfloat16_parts, decoder_sdpa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import cuda_median_ms  # noqa: E402

TOKENS, WIDTH, CHUNK = 128 * 128, 512, 4096


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: Callable, mix: Callable) -> torch.Tensor:
    """Attention over query chunks: ``scores(q_chunk, k)`` then softmax then ``mix(p, v)``."""
    scale = q.shape[-1] ** -0.5
    return torch.cat([mix(torch.softmax(scores(part, k) * scale, dim=-1), v) for part in q.split(CHUNK)])


def conv_product(a: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """``a @ b_rows.T`` as a 1x1 convolution: ``a``'s rows are pixels, its columns channels (NHWC)."""
    pixels = a.t()[None, :, :, None]  # (1, C, rows, 1), channels innermost in memory
    out = F.conv2d(pixels, b_rows[:, :, None, None])
    return out[0, :, :, 0].t()


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high = x.to(torch.bfloat16)
    return high, (x - high.float()).to(torch.bfloat16)


def bf16x3_product(a: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """``a @ b_rows.T`` to about 16 bits: a_hi b_hi + a_hi b_lo + a_lo b_hi in one product over K."""
    (ah, al), (bh, bl) = split_bf16(a), split_bf16(b_rows)
    return torch.mm(torch.cat([ah, ah, al], dim=1), torch.cat([bh, bl, bh], dim=1).t(), out_dtype=torch.float32)


def gesso_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **settings: Any) -> Callable[[], torch.Tensor]:
    """A way that runs gesso's attention on one head with some of its module's names replaced for the call."""

    def way() -> torch.Tensor:
        saved = {name: getattr(decoder_attention, name) for name in settings}
        for name, value in settings.items():
            setattr(decoder_attention, name, value)
        try:
            return decoder_sdpa(q[None, None], k[None, None], v[None, None])[0, 0]
        finally:
            for name, value in saved.items():
                setattr(decoder_attention, name, value)

    return way


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(TOKENS, WIDTH, device="cuda", generator=generator) for _ in range(3))
    v_t = v.t().contiguous()
    with torch.no_grad():
        exact = chunked(q.double(), k.double(), v.double(), lambda a, b: a @ b.t(), lambda p, b: p @ b)
        ways: dict[str, Callable[[], torch.Tensor]] = {
            "sdpa": lambda: F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None])[0, 0],
            "matmul, ieee": lambda: chunked(q, k, v, lambda a, b: a @ b.t(), lambda p, b: p @ b),
            "cudnn 1x1": lambda: chunked(q, k, v_t, conv_product, conv_product),
            "bf16x3": lambda: chunked(q, k, v_t, bf16x3_product, bf16x3_product),
            "gesso decoder_attention_bf16x3": gesso_with(q, k, v),
            "gesso, softmax then split eagerly": lambda: attention_in_bfloat16_parts(q[None, None], k[None, None], v[None, None])[0, 0],
            "gesso, 64 MiB of scores a chunk": gesso_with(q, k, v, SCORES_BYTES=64 * 2**20),
        }
        report: dict[str, Any] = {"torch": torch.__version__, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "ways": {}}
        for name, way in ways.items():
            report["ways"][name] = measure(way, exact)
            print(name, report["ways"][name], flush=True)
        torch.backends.cuda.matmul.allow_tf32 = True
        report["ways"]["matmul, tf32 flag"] = measure(ways["matmul, ieee"], exact)
        print("matmul, tf32 flag", report["ways"]["matmul, tf32 flag"], flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        report["decode_ms"] = time_decodes()
        print("SDXL float32 decode at 1024x1024, ms:", report["decode_ms"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def time_decodes() -> dict[str, Any]:
    """SDXL's full-size float32 VAE decode (random weights), eager, with its attention as SDPA and as bfloat16 parts:
    milliseconds, and the decode's peak of allocated memory in GiB."""
    from checkpoints import _clean, architectures, fill_random
    from gesso.nn import AutoencoderKL
    from gesso.nn.attention import Attention

    def parts_with_eager_softmax(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        return attention_in_bfloat16_parts(query, key, value)

    with torch.device("cuda"):
        vae = AutoencoderKL.from_config(_clean(architectures()["sdxl"]["vae"])).eval()
    fill_random(vae, 0)
    latents = torch.randn(1, 4, 128, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    attentions = [m for m in vae.decoder.modules() if isinstance(m, Attention)]
    times: dict[str, Any] = {"sdpa": [], "bf16x3": [], "bf16x3, softmax then split eagerly": []}
    for _ in range(2):  # two rounds, alternating
        for name, sdpa in (("sdpa", None), ("bf16x3", decoder_sdpa), ("bf16x3, softmax then split eagerly", parts_with_eager_softmax)):
            for attention in attentions:
                attention.sdpa = sdpa
            times[name].append(cuda_median_ms(lambda: vae.decode(latents), repeat=10))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            vae.decode(latents)
            times[f"{name} peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return times


def measure(way: Callable[[], torch.Tensor], exact: torch.Tensor) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        out = way()
    except (RuntimeError, TypeError) as error:
        return {"error": str(error).splitlines()[0][:200]}
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start  # compiles included
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = [cuda_median_ms(way) for _ in range(3)]
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    error = ((out.double() - exact).abs().max() / exact.abs().max()).item()
    return {"ms": times, "relative_error": error, "scratch_mib": round(extra, 1), "first_call_s": round(first_call_s, 2)}


if __name__ == "__main__":
    main()
