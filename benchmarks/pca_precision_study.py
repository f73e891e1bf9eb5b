"""Could HiDe's PCA stage run in float32 where that is exact enough? (issue 13's 3x goal)

For each case of tests/test_exactness.py: the float32 pipeline's error (the PCA stage in
float32, every backend's former behaviour) against the authors' float64 loss, the bar
max(2e-4, 2 x the authors' float32 error), and the a-priori estimate ε·λ_max/gap at the
cutoff that an adaptive precision rule would have to read. Then single-1k timings, the
float64 and float32 PCA stage and the authors' loss interleaved in one run (medians).
Prints a table; the committed output is under benchmarks/results/.

    cd /tmp && python /path/to/benchmarks/pca_precision_study.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import himo_fast  # noqa: E402
from himo_fast import pca  # noqa: E402
import test_exactness as te  # noqa: E402
from official import official_loss  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def with_pca_dtype(dtype, fn):
    old, pca.PCA_DTYPE = pca.PCA_DTYPE, dtype
    try:
        return fn()
    finally:
        pca.PCA_DTYPE = old


def accuracy_rows():
    print(f"{'case':<28} {'m':>4} {'gap/λmax':>9} {'ε·λmax/gap':>10} {'fp32 err':>9} {'bar':>9}")
    for case in te.CASES:
        n, d, tau, decay = case
        v, u, s, want, bar = te._case(*case)
        x = (u - u.mean(0)).double()
        lam = torch.linalg.eigvalsh(pca.gram_or_cov(x, n <= d)).flip(0).clamp(min=0)
        m = int(pca.cutoff_from_eigvals(lam, tau)[0])
        gap = (lam[m - 1] - lam[m]).item() if m < lam.numel() else float("inf")
        loss = himo_fast.MoLo(tau=tau, backend="cpu")
        got = with_pca_dtype(torch.float32, lambda: te._run(
            lambda a, b, c: tuple(loss(a, b, c, output_dict=True).values()), v, u, s))
        err = te._error(got, want)
        name = f"N={n} d={d} τ={tau} {'decay' if decay else 'iso'}"
        print(f"{name:<28} {m:>4} {gap / lam[0].item():9.2e} {EPS * lam[0].item() / gap:10.2e} "
              f"{err:9.2e} {bar:9.2e} {'FAILS' if err > bar else ''}", flush=True)


def timing_rows(rounds=12):
    g = torch.Generator().manual_seed(0)
    v, u = te.clip_like_pairs(1024, 768, torch.float32, generator=g)
    v.requires_grad_()
    u.requires_grad_()
    s = torch.tensor(14.0)
    loss = himo_fast.MoLo(tau=0.9, label_smoothing=0.1)
    molo = lambda: sum(loss(v, u, s, output_dict=True).values()).backward()
    runs = {"MoLo, PCA in float64 (shipped)": lambda: with_pca_dtype(torch.float64, molo),
            "MoLo, PCA in float32 (inexact at high τ)": lambda: with_pca_dtype(torch.float32, molo),
            "authors' loss": lambda: sum(official_loss(v, u, s, tau=0.9, eps=0.1)).backward()}
    times = {k: [] for k in runs}
    for r in range(rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if r >= 2:
                times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    ref = med["authors' loss"]
    for k, t in med.items():
        print(f"single-1k {k:<42} {t:7.1f} ms  ({ref / t:.2f}x the authors')")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    accuracy_rows()
    timing_rows()
