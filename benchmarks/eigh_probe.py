"""Which symmetric eigensolver can HiDe use on a GPU? For each candidate and size: accuracy
against float64 LAPACK, median time, whether torch's sync-debug mode sees a host sync (it
sees torch's own only: a sync inside cuSOLVER shows as a failed capture instead) and whether
it can be captured in a CUDA graph (each capture in a fresh process: a failed capture breaks
the context for everything after it).

    python benchmarks/eigh_probe.py [--sizes 128 768 1024] [--repeats 20] [--json PATH]

Candidates: torch.linalg.eigh (syevd, then a host read of its status), himo_fast::sym_eigh
with cuSOLVER's syevd and XsyevBatched, the Triton Jacobi solver and the Triton tridiagonal
solver (kernels/eigh.py: tridiagonal_eigh, up to its TRIDIAGONAL_MAX; above SMALL_MAX its
grid reduction, which HiDe uses in captures only). A candidate that captures is also timed
as a graph replay (`graph ms`: no launch overhead). On a GPU, ``--profile`` adds the
tridiagonal solver's device time per kernel at each size (torch profiler): where its time
goes.
On an H100 (2026-11-22) syevd was sync-free but not capturable, 8.2 ms at 768; XsyevBatched
captured at 128 only; syevj (dropped since) was slower, less accurate, not capturable.
Without a GPU it runs the same on the CPU (no capture; Jacobi under TRITON_INTERPRET=1), so
that tests can keep it working.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

import himo_fast  # noqa: F401  (registers himo_fast::sym_eigh)
from himo_fast import ops

CANDIDATES = ["torch.linalg.eigh", "syevd", "syev_batched", "jacobi", "tridiagonal"]

CAPTURE = """
import sys, torch
from eigh_probe import median_ms, solver
name, k = sys.argv[1], int(sys.argv[2])
x = torch.randn(k + 3, k, dtype=torch.float64)
a = (x.T @ x).to("cuda", torch.float32)
fn = solver(name)
run = lambda: fn(a)[0]
w = run()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    run()
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    w_g = run()
graph.replay()
torch.cuda.synchronize()
err = ((w_g - w).norm() / w.norm()).item()
assert err <= 1e-5, err
print("graph_ms", median_ms(lambda _: graph.replay(), a))
"""


def solver(name):
    if name == "torch.linalg.eigh":
        return torch.linalg.eigh
    if name == "jacobi":
        from himo_fast.kernels.eigh import jacobi_eigh
        return jacobi_eigh
    if name == "tridiagonal":
        from himo_fast.kernels.eigh import tridiagonal_eigh
        return tridiagonal_eigh
    return lambda a: torch.ops.himo_fast.sym_eigh(a, name)[:2]


def accuracy(a, w, v):
    """(eigenvalue error against float64 LAPACK, ‖AV − VΛ‖ / ‖A‖), both relative."""
    ref = torch.linalg.eigvalsh(a.double().cpu())
    a64, w64, v64 = a.double().cpu(), w.double().cpu(), v.double().cpu()
    return (((w64 - ref).norm() / ref.norm()).item(),
            ((a64 @ v64 - v64 * w64).norm() / a64.norm()).item())


def median_ms(fn, a, repeats=20):
    if a.is_cuda:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(a)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(a)
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def syncs(fn, a):
    if not a.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(a)
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(0)


def captures(name, k):
    """(captured?, the error's line or None, replay ms or None), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CAPTURE, name, str(k)], capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode == 0:
        return True, None, float(out.stdout.split("graph_ms")[-1])
    errors = [line for line in out.stderr.splitlines() if "Error" in line] or [""]
    return False, errors[-1][:200], None


def probe(sizes, device, names=CANDIDATES, repeats=20):
    rows = []
    for k in sizes:
        g = torch.Generator().manual_seed(k)
        x = torch.randn(k + 3, k, dtype=torch.float64, generator=g)
        a = (x.T @ x).to(device, torch.float32)
        for name in names:
            if name == "tridiagonal" and k > _tridiagonal_max():
                continue
            fn = solver(name)
            try:
                w, v = fn(a)  # warm-up: handles, workspace
                row = dict(zip(("eig_err", "residual"), accuracy(a, w, v)))
                row.update(ms=median_ms(fn, a, repeats), syncs=syncs(fn, a))
                if a.is_cuda:
                    row["captures"], row["capture_error"], row["graph_ms"] = captures(name, k)
            except RuntimeError as err:  # a candidate this cuSOLVER refuses: say so, go on
                row = {"error": str(err).splitlines()[0][:200]}
            rows.append(dict(solver=name, k=k, device=str(device), **row))
    return rows


def _tridiagonal_max():
    from himo_fast.kernels.eigh import TRIDIAGONAL_MAX
    return TRIDIAGONAL_MAX


def kernel_times(fn):
    """[(name, launches, µs each)] of one call of ``fn()``, largest total first: device time
    per kernel on CUDA (the profiler's CUDA activity only, so nothing counts twice), self
    time per op on the CPU. ``fn`` runs once before, so that first-call work is left out."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        sync()
    time_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    rows = sorted(((e.key[:48], e.count, round(time_of(e) / max(e.count, 1), 1))
                   for e in prof.key_averages() if time_of(e) > 0), key=lambda r: -r[1] * r[2])
    return rows


def profile_small(sizes):
    """Device µs per kernel (name, launches, µs each) of one tridiagonal_eigh per size."""
    from himo_fast.kernels.eigh import tridiagonal_eigh
    for k in (k for k in sizes if k <= _tridiagonal_max()):
        x = torch.randn(k + 3, k, dtype=torch.float64)
        a = (x.T @ x).cuda()
        rows = kernel_times(lambda: tridiagonal_eigh(a))
        total = sum(r[1] * r[2] for r in rows)
        print(f"tridiagonal_eigh k={k}: {total:.0f} us of kernels:", rows, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 768, 1024])
    p.add_argument("--repeats", type=int, default=20, help="timed runs (median)")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--profile", action="store_true", help="per-kernel time of the Triton "
                   "tridiagonal solver (CUDA only)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__, cuda=torch.version.cuda,
                sym_eigh_on_cuda=device == "cuda" and ops.SYM_EIGH_ON_CUDA)
    rows = probe(a.sizes, device, repeats=a.repeats)
    print(json.dumps(info))
    print(f"{'solver':>18} {'k':>5} {'ms':>8} {'graph ms':>8} {'eig err':>9} {'residual':>9} "
          f"{'syncs':>6} captures")
    for r in rows:
        if "error" in r:
            print(f"{r['solver']:>18} {r['k']:>5}  error: {r['error']}")
            continue
        cap = r.get("captures")
        cap = "n/a" if cap is None else ("yes" if cap else f"no ({r['capture_error']})")
        graph = "" if r.get("graph_ms") is None else f"{r['graph_ms']:.3f}"
        print(f"{r['solver']:>18} {r['k']:>5} {r['ms']:8.3f} {graph:>8} {r['eig_err']:9.1e} "
              f"{r['residual']:9.1e} {str(r['syncs']):>6} {cap}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    if a.profile and device == "cuda":
        profile_small(a.sizes)


if __name__ == "__main__":
    main()
