"""Probe: residual add + LayerNorm, Inductor against a hand Triton kernel, at the UNets' token shapes.

    python benchmarks/probes/layer_norm.py

Timed as 20 calls inside a CUDA graph (L2 warm, as in the step). The hand kernel is the yardstick
that showed Inductor's looped reduction of 1,280-wide rows at twice the time a one-pass kernel needs
(``benchmarks/NOTES.md``, seventh session); gesso does not ship it (``gesso.optimize.heuristics``
has Inductor generate the one-pass form instead)."""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def add_ln(x_ptr, y_ptr, w_ptr, b_ptr, s_ptr, o_ptr, rows, C: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, eps):
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    mask = (r < rows) & (c < C)
    x = tl.load(x_ptr + r * C + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + r * C + c, mask=mask, other=0.0).to(tl.float32)
    s = x + y
    s16 = s.to(tl.float16)
    tl.store(s_ptr + r * C + c, s16, mask=mask)
    s = s16.to(tl.float32)
    mean = tl.sum(s, axis=1)[:, None] / C
    d = tl.where(mask, s - mean, 0.0)
    var = tl.sum(d * d, axis=1)[:, None] / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    tl.store(o_ptr + r * C + c, (d * rstd * w + b).to(tl.float16), mask=mask)


def captured(fn, calls=1):
    """``calls`` calls of ``fn`` captured as one graph after three warm-up calls on a side stream;
    returns the graph and what its last call returned (the graph's output buffers)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn()
    return g, out


def graph_time(fn, calls=20, reps=30):
    """Median microseconds per call of ``fn``, replayed ``calls`` times per CUDA graph."""
    g, _ = captured(fn, calls)
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    times.sort()
    return times[len(times) // 2]


def main():
    torch.manual_seed(0)
    shapes = [(2048, 1280), (8192, 640), (8192, 320), (2048, 640), (512, 1280), (4608, 384)]

    def eager_ref(x, y, w, b):
        s = x + y
        return s, F.layer_norm(s, (x.shape[-1],), w, b, 1e-5)

    compiled = torch.compile(eager_ref, dynamic=False)
    print(f"{'shape':>14s} {'bytes MB':>8s} {'inductor us':>11s} {'floor us':>8s}  best triton (rows, warps): us")
    for rows, C in shapes:
        x = torch.randn(rows, C, device="cuda", dtype=torch.float16)
        y = torch.randn(rows, C, device="cuda", dtype=torch.float16)
        w = torch.randn(C, device="cuda", dtype=torch.float16)
        b = torch.randn(C, device="cuda", dtype=torch.float16)
        s_out = torch.empty_like(x)
        o_out = torch.empty_like(x)
        ref_s, ref_o = eager_ref(x.float(), y.float(), w.float(), b.float())
        t_ind = graph_time(functools.partial(compiled, x, y, w, b))
        nbytes = 4 * rows * C * 2
        results = []
        BLOCK = triton.next_power_of_2(C)
        for R in (1, 2, 4, 8):
            for warps in (1, 2, 4, 8):
                if R * BLOCK // (32 * warps) < 1:
                    continue
                grid = (triton.cdiv(rows, R),)
                fn = functools.partial(add_ln[grid], x, y, w, b, s_out, o_out, rows, C, BLOCK, R, 1e-5, num_warps=warps)
                fn()
                err = ((o_out.float() - ref_o).norm() / ref_o.norm()).item()
                if err > 5e-3:
                    print("bad", R, warps, err)
                    continue
                results.append((graph_time(fn), R, warps))
        results.sort()
        best = results[0]
        print(
            f"{str((rows, C)):>14s} {nbytes / 1e6:8.1f} {t_ind:11.2f} {nbytes / 4.3e6:8.2f}  ({best[1]}, {best[2]}): {best[0]:.2f}  next: {[(round(t, 2), r, w) for t, r, w in results[1:4]]}"
        )


if __name__ == "__main__":
    main()
