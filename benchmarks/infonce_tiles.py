"""Tile sweep of the fused Triton dual InfoNCE kernels (kernels/infonce.py) on a GPU.

    python benchmarks/infonce_tiles.py [--n 65536] [--d 768] [--json FILE]
    ... --quick   # tiny shapes, two configurations each, on the CPU under TRITON_INTERPRET=1
                  # too (CI runs this, so the script cannot rot)

Times the square forward (row and column log-sum-exps of s·P·Qᵀ, N x N, one pass), the
backward kernel (dP with both sides' statistics, the square case's heaviest launch) and
the strip route of the backward (both gradients) against the recompute route, for
each tile configuration, bf16 inputs, median of a few runs after a warm-up (that compiles).
Each configuration's output is checked against the first one's, so a fast wrong tile
cannot win. TFLOP/s are counted two ways: useful (one N²·d product forward, two backward)
and executed (the recomputes too: the backward's chunks each recompute the tiles).
The winner goes into FWD_BLOCKS / BWD_BLOCKS / BLOCK_D_MAX / WEIGHT_BLOCKS (and the
route into use_strips) by hand, with the results
file committed under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goals import DEVICE, median_ms  # noqa: E402  (the same timing as the goal tables)

# About 20 configurations, a compile each (seconds): the sweep fits one device call.
FWD = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=3)
       for m, n, k, w in itertools.product((64, 128), (64, 128), (64,), (4, 8))] + [
       dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)]
BWD = [(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=64, num_warps=8, num_stages=st), dmax)
       for m, n, st, dmax in itertools.product((64, 128), (32, 64), (2, 3), (256, 512))
       if m * dmax <= 64 * 512]  # the fp32 accumulator: at most 128 registers a thread
WEIGHT = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=64, num_warps=w, num_stages=3)
          for m, n, w in ((64, 64, 4), (128, 64, 8), (128, 128, 8), (64, 128, 4))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    fwd_configs, bwd_configs, weight_configs = (
        (FWD[:2], BWD[:2], WEIGHT[:1]) if a.quick else (FWD, BWD, WEIGHT))
    if a.quick:
        a.n, a.d = 70, 40
    from himo_fast.kernels import infonce
    import triton
    n, d = a.n, a.d
    g = torch.Generator(device=DEVICE).manual_seed(0)
    mk = lambda: torch.nn.functional.normalize(
        torch.randn(n, d, device=DEVICE, generator=g), dim=-1).to(torch.bfloat16)
    img, txt = mk(), mk()
    s = torch.tensor([30.0], device=DEVICE)
    ref = ((img.float() * txt.float()).sum(1) * s).contiguous()
    stats = lambda nll: torch.stack([nll, ref, torch.full_like(ref, 1 / n), torch.zeros_like(ref),
                                     torch.full_like(ref, 1 / n)]).contiguous()
    flop = 2 * n * n * d
    out = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, n=n, d=d,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), fwd=[], bwd=[])
    defaults = (dict(infonce.FWD_BLOCKS), dict(infonce.BWD_BLOCKS), infonce.BLOCK_D_MAX,
                dict(infonce.WEIGHT_BLOCKS))
    first = None
    for cfg in fwd_configs:
        infonce.FWD_BLOCKS = cfg
        try:
            nll = torch.cat(infonce.lse_rows_and_cols(img, txt, s, ref))
            ms = median_ms(lambda: infonce.lse_rows_and_cols(img, txt, s, ref), 5)
        except Exception as e:  # out of shared memory or registers: say so, go on
            out["fwd"].append(dict(cfg=cfg, error=str(e)[:200]))
            print("fwd", cfg, "failed:", str(e)[:120], flush=True)
            continue
        first = nll if first is None else first
        err = (nll - first).abs().max().item()
        out["fwd"].append(dict(cfg=cfg, ms=ms, tflops=flop / ms / 1e9, max_diff=err))
        print(f"fwd {cfg}: {ms:.2f} ms, {flop / ms / 1e9:.0f} TFLOP/s, diff {err:.1e}", flush=True)
    infonce.FWD_BLOCKS = defaults[0]
    side, side_t = map(stats, infonce.lse_rows_and_cols(img, txt, s, ref))
    first = None
    for cfg, dmax in bwd_configs:
        infonce.BWD_BLOCKS, infonce.BLOCK_D_MAX = cfg, dmax
        call = lambda: infonce.ce_grad(img, txt, s, side, side_t, 0, True)
        try:
            dp, _ = call()
            ms = median_ms(call, 5)
        except Exception as e:
            out["bwd"].append(dict(cfg=cfg, block_d_max=dmax, error=str(e)[:200]))
            print("bwd", cfg, dmax, "failed:", str(e)[:120], flush=True)
            continue
        first = dp.float() if first is None else first
        err = ((dp.float() - first).norm() / first.norm()).item()
        chunks = sum(c for _, _, c in infonce.d_chunks(d, dmax))
        executed = flop * (chunks + 1)
        out["bwd"].append(dict(cfg=cfg, block_d_max=dmax, ms=ms, useful_tflops=flop / ms / 1e9,
                               executed_tflops=executed / ms / 1e9, rel_diff=err))
        print(f"bwd {cfg} D<={dmax}: {ms:.2f} ms, useful {flop / ms / 1e9:.0f}, executed "
              f"{executed / ms / 1e9:.0f} TFLOP/s, diff {err:.1e}", flush=True)
    infonce.BWD_BLOCKS, infonce.BLOCK_D_MAX = defaults[1], defaults[2]
    # The two backward routes for the whole square matrix (both gradients), side by side:
    # recompute = ce_grad twice (default tiles), strips = W strips + cuBLAS per WEIGHT tile.
    both = lambda: (infonce.ce_grad(img, txt, s, side, side_t, 0, True),
                    infonce.ce_grad(txt, img, s, side_t, side, 0, False))
    out["recompute_ms"] = median_ms(both, 5)
    print(f"backward, both gradients, recompute route: {out['recompute_ms']:.2f} ms", flush=True)
    want = both()[0][0].float()
    out["strips"] = []
    for cfg in weight_configs:
        infonce.WEIGHT_BLOCKS = cfg
        call = lambda: infonce.strips_backward(img, txt, s, side, side_t, 0)
        try:
            dp = call()[0]
            ms = median_ms(call, 5)
        except Exception as e:
            out["strips"].append(dict(cfg=cfg, error=str(e)[:200]))
            print("strips", cfg, "failed:", str(e)[:120], flush=True)
            continue
        err = ((dp.float() - want).norm() / want.norm()).item()
        out["strips"].append(dict(cfg=cfg, ms=ms, rel_diff=err))
        print(f"strips {cfg}: {ms:.2f} ms (recompute {out['recompute_ms']:.2f}), diff {err:.1e}",
              flush=True)
    infonce.WEIGHT_BLOCKS = defaults[3]
    for kind in ("fwd", "bwd", "strips"):
        ok = [r for r in out[kind] if "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"best {kind}: {best}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
