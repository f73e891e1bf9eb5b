"""What a MoLo step holds in memory at any N, counted on meta tensors (no GPU, no memory).

    python benchmarks/meta_memory.py [--n 262144] [--d 768] [--backend cuda] [--route strips]

Runs the loss forward and backward on meta tensors (bf16 features, as on a GPU) under
tests/conftest.py's LiveStorage and prints the peak of the storages it creates beyond the
inputs and their gradients, and what is alive when the dual InfoNCE op is called. Not
seen: what a compiled op allocates inside itself. For `himo_fast::dual_ce` add, at its
backward, one strip of weights (2^25 logits: 192 MiB strips, 64 MiB tiles) and, where
col_grad "auto" accumulates the columns' gradient (N ≤ 131072 on CUDA), one fp32
accumulator of it (N·width·4 bytes); at its forward, tiles, the column partials (8 bytes
per column and row block of a launch: ≤ 528 blocks, ≤ 2^25 / N of them). The script prints
that estimate too. On 2026-12-07 it showed
HiDe's whole float64 copies (13 GiB at N = 262144), since cut to row blocks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import LiveStorage  # noqa: E402

import himo_fast  # noqa: E402
from himo_fast import backends  # noqa: E402


# csrc/dual_infonce_cuda.cu's kCudaStripElements and kCudaRecomputeBelowRows;
# csrc/dual_infonce_tiles_cuda.cu's row blocks per lse launch (kCudaLseRows / kM) and
# csrc/logit_tile.h's rows of a tile (kM)
CUDA_STRIP_ELEMENTS, CUDA_RECOMPUTE_BELOW_ROWS, CUDA_LSE_BLOCKS, TILE_ROWS = 2**25, 256, 528, 64


def cuda_auto_col_grad(n: int) -> tuple[int, bool]:
    """(rows a strip, whether col_grad "auto" recomputes) for a square batch of N on CUDA:
    csrc/dual_infonce.cpp's recompute_columns with those constants."""
    rows = max(1, min(n, CUDA_STRIP_ELEMENTS // n))
    return rows, rows < n and rows < CUDA_RECOMPUTE_BELOW_ROWS


def cuda_tiles_partials_bytes(n: int) -> int:
    """The column partials of one lse launch of the tiles route, square batch of N on CUDA:
    csrc/dual_infonce.cpp's tile_lse_rows."""
    return 8 * n * min(CUDA_LSE_BLOCKS, max(1, CUDA_STRIP_ELEMENTS // n), -(-n // TILE_ROWS))


class Calls(LiveStorage):
    """LiveStorage, noting the live bytes as each dual InfoNCE op returns."""

    def __init__(self):
        super().__init__()
        self.at_op = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if "dual_ce" in str(func):
            self.at_op.append((str(func), self.now))
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=262144)
    p.add_argument("--d", type=int, default=768)
    # cuda: its ops have fake (meta) kernels; reference: plain torch. The triton backend's
    # HiDe launches Triton kernels directly, which meta tensors cannot run.
    p.add_argument("--backend", default="cuda", choices=["cuda", "reference"])
    p.add_argument("--route", default="strips", choices=["strips", "tiles"])
    a = p.parse_args(argv)
    impl = backends._REGISTRY[a.backend].build("cuda")  # its GPU form, run on meta tensors
    if not isinstance(impl, backends.Impl):
        print(f"backend {a.backend!r} cannot be built here: {impl}")
        return 1
    backends._BUILT[(a.backend, "meta")] = impl
    backends.CUDA_ROUTE = a.route
    img, txt = (torch.empty(a.n, a.d, device="meta", dtype=torch.bfloat16).requires_grad_()
                for _ in range(2))
    scale = torch.tensor(100.0, device="meta", requires_grad=True)
    loss = himo_fast.MoLo(tau=0.9, label_smoothing=0.1, backend=a.backend)
    MiB, grads = 2**20, 2 * a.n * a.d * 2
    with Calls() as live:
        loss(img, txt, scale).backward()
    who = f"{a.backend}, {a.route}" if a.backend == "cuda" else a.backend
    print(f"MoLo ({who}), N={a.n}, d={a.d}, bf16: peak beyond inputs and "
          f"gradients {(live.peak - grads) / MiB:.0f} MiB (one N x d fp32 tensor is "
          f"{a.n * a.d * 4 / MiB:.0f} MiB)")
    for name, now in live.at_op:
        print(f"  alive when {name} returns: {now / MiB:.0f} MiB (its outputs included)")
    if a.backend != "cuda":
        return 0  # no compiled op: nothing unseen
    # inside the op's backward (not seen above)
    strip_rows, recomputes = cuda_auto_col_grad(a.n)
    accumulator = 0 if recomputes else a.n * a.d * 4
    strip = CUDA_STRIP_ELEMENTS * (6 if a.route == "strips" else 2)
    print(f"  inside dual_ce_backward (by hand): {strip / MiB:.0f} MiB of weights strip, "
          f"{accumulator / MiB:.0f} MiB of columns' accumulator (col_grad auto "
          f"{'accumulates' if accumulator else 'recomputes'} at {strip_rows} rows a strip)")
    if a.route == "tiles":
        print(f"  inside dual_ce (by hand): {cuda_tiles_partials_bytes(a.n) / MiB:.0f} MiB of "
              f"column partials per lse launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
