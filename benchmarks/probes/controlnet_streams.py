"""Probe: the ControlNet on a second stream, alongside the UNet's down blocks, inside one CUDA graph.

    python benchmarks/probes/controlnet_streams.py [--out FILE]

Neither the UNet's down blocks nor its mid block read the ControlNet's residuals: they are added to
the skips and the mid block's output only after that block. So the net and the UNet's first half
can run at the same time. At 512x512 most
of the net's kernels at its 16x16 and 8x8 levels fill a fraction of the GPU's multiprocessors, and
each kernel of a graph leaves a gap of about a microsecond before the next: two branches can fill
both. Full-size random weights, float16, batch 2, ``fast``'s members less ``cuda_graph`` (regional
compile included); each way captured as one graph of the whole step:

- ``in turn``: the net, then the UNet (what ``cuda_graph`` does today, in one graph instead of two);
- ``side stream, joined before the mid block``: the net on a forked stream, which the UNet waits
  for after its down blocks (a forward pre-hook on its mid block; what the sixteenth session built);
- ``side stream``: the same, joined where the UNet adds the residuals, after its mid block
  (``gesso.streams.InFlight``, as ``controlnet_side_stream`` passes them).

Also times the two graphs ``cuda_graph`` captures today, and the largest difference between the ways'
outputs (the same kernels on the same inputs: expected 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from gesso.streams import InFlight

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layer_norm import captured  # noqa: E402  (this folder: the script's own)
from profile_step import build  # noqa: E402
from run import cuda_median_ms, fast_members  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from gesso.contract import ExecutionPolicy
    from gesso.runner import optimize

    built, _, family = build("controlnet_sd15")
    modules = {name: getattr(built, name) for name in built.hot_loop}
    policy = ExecutionPolicy(hot_loop=built.hot_loop)
    names = [n for n in fast_members(family, policy) if n != "cuda_graph"]
    holder = SimpleNamespace(**modules, conditioners=[])
    optimize(holder, names, device="cuda", family=family, policy=policy)
    unet, net = modules["unet"], modules["controlnet"]

    generator = torch.Generator("cuda").manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16, generator=generator)
    text = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16, generator=generator)
    control = torch.rand(2, 3, 512, 512, device="cuda", dtype=torch.float16, generator=generator)
    t = torch.tensor(500.0, device="cuda")
    fork = torch.cuda.Stream()

    def in_turn() -> torch.Tensor:
        down, mid = net(sample, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        return unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]

    def side_stream() -> torch.Tensor:
        fork.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(fork):
            down, mid = net(sample, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        residuals = dict(down_block_additional_residuals=InFlight(down, fork), mid_block_additional_residual=InFlight(mid, fork))
        out = unet(sample, t, text, **residuals, return_dict=False)[0]
        torch.cuda.current_stream().wait_stream(fork)  # a capture must end with its forks joined
        return out

    def join_before_mid_block(module: Any, args: Any) -> None:
        torch.cuda.current_stream().wait_stream(fork)

    def side_stream_joined_early() -> torch.Tensor:
        hook = unet.mid_block.register_forward_pre_hook(join_before_mid_block)
        try:
            return side_stream()
        finally:
            hook.remove()

    report: dict[str, Any] = {"optimizations": names, "torch": torch.__version__, "ms": {}}
    with torch.no_grad():
        outputs = {}
        ways = (("in turn", in_turn), ("side stream, joined before the mid block", side_stream_joined_early), ("side stream", side_stream))
        for name, fn in ways:
            graph, out = captured(fn)
            replay = graph.replay
            replay()
            torch.cuda.synchronize()
            outputs[name] = out.float().clone()
            report["ms"][name] = [cuda_median_ms(replay) for _ in range(3)]
            print(name, report["ms"][name], flush=True)
        net_graph, (down, mid) = captured(lambda: net(sample, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False))
        unet_graph, _ = captured(
            lambda: unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
        )

        net_replay, unet_replay = net_graph.replay, unet_graph.replay

        def two_graphs() -> None:
            net_replay()
            unet_replay()

        report["ms"]["two graphs (cuda_graph today)"] = [cuda_median_ms(two_graphs) for _ in range(3)]
        report["ms"]["net alone"] = [cuda_median_ms(net_replay) for _ in range(3)]
        report["ms"]["unet alone"] = [cuda_median_ms(unet_replay) for _ in range(3)]
        for name in list(report["ms"])[len(ways) :]:
            print(name, report["ms"][name], flush=True)
    report["max_abs_difference"] = max((outputs["in turn"] - out).abs().max().item() for out in outputs.values())
    print("largest difference between the ways:", report["max_abs_difference"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
