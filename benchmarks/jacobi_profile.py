"""Where the Jacobi eigensolver's time goes on a GPU: per-launch kernel time (torch
profiler) of one sweep at each size and tile shape, against an empty Triton kernel's, and
graph replays. First run (H100, 2026-11-23): an empty kernel is 0.8 us and 1.2 us a graph
node, yet a whole 13-sweep solve took 28 ms at n = 128 and 389 ms at n = 768 (17 and 39 us
a step): the step kernel itself is the cost.

    python benchmarks/jacobi_profile.py [--sizes 128 768]
"""
import argparse
import importlib

import torch
import triton
from eigh_probe import median_ms  # benchmarks/ is the script's folder


# The module, not the package's eigh function of the same name.
eigh = importlib.import_module("himo_fast.kernels.eigh")


@triton.jit
def _empty(x_ptr):
    pass


def kernel_us(fn, name_part):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if name_part in e.key]
    return [(e.key[:40], e.count, e.device_time_total / max(e.count, 1)) for e in rows]


def graph_ms(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return median_ms(lambda _: g.replay(), torch.zeros(1, device="cuda"), repeats)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 768])
    a = p.parse_args()
    x = torch.zeros(1, device="cuda")
    print("empty kernel", kernel_us(lambda: [_empty[(1,)](x) for _ in range(200)], "_empty"))
    print("empty kernel x1000 graph ms", graph_ms(lambda: [_empty[(1,)](x) for _ in range(1000)]))
    for k in a.sizes:
        g = torch.Generator().manual_seed(k)
        m = torch.randn(k + 3, k, dtype=torch.float64, generator=g)
        mat = (m.T @ m).cuda().float()
        for pairs, rows in [(32, 64), (16, 32), (64, 64), (8, 32)]:
            eigh.BLOCK_PAIRS, eigh.BLOCK_ROWS = pairs, rows
            print(k, f"tiles {pairs}/{rows}: one sweep, per launch (name, count, us):",
                  kernel_us(lambda: eigh.jacobi_eigh(mat, sweeps=1), "jacobi"),
                  "graph ms", graph_ms(lambda: eigh.jacobi_eigh(mat, sweeps=1)),
                  "launches", k + k % 2 - 1, flush=True)


if __name__ == "__main__":
    main()
