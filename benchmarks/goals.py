"""The goal tables of the GPU speed issues, measured in one call per table.

    python benchmarks/goals.py hide     # issue 15: HiDe's eigensolver path on an H100
    python benchmarks/goals.py infonce  # issue 16: the dual InfoNCE at large N (with Inf-CL)
    python benchmarks/goals.py col_grad # issue 16: a square branch's columns' gradient,
                                        # accumulated or recomputed, at N = 2^17 and 2^18
    ... --json FILE                     # the rows as JSON too (gpu_check.sh: goals_* stages)
    ... --quick                         # small shapes (CI runs this on the CPU, so it cannot rot)

Each row: what is measured, the value, the goal and whether it is met; a row that needs what
this machine lacks (CUDA, inf_cl) says so instead of a number. Times are medians of forward
+ backward after warm-up, the device synchronised around each; ratios are taken in the same
run. Run it with the installed package (from another folder than the repo root).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

import himo_fast  # noqa: E402
from himo_fast import backends, graphs as stage_graphs  # noqa: E402
from himo_fast.train import step_timing  # noqa: E402
from official import official_hide  # noqa: E402
import test_losses as losses  # noqa: E402  (the workloads' step builders, shared)

DEVICE = losses.DEVICE
CUDA = DEVICE == "cuda"
_sync = losses._sync
# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by device name.
BF16_PEAK = {"H100": 989.4, "H200": 989.4}


def median_ms(step, rounds: int) -> float:
    step()  # warm-up: compile, handles, workspaces
    _sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def row(measure, value, goal, met, unit="", note=""):
    return dict(measure=measure, value=value, unit=unit, goal=goal, met=met, note=note)


def missing(measure, goal, why):
    return row(measure, None, goal, None, note=why)


def loss_step(impl_name, B, N, d, dtype):
    """A forward+backward closure of one loss workload of benchmarks/test_losses.py."""
    sets = losses._inputs(B, N, dtype, d)
    s = torch.tensor(100.0, device=DEVICE, requires_grad=True)
    fn = losses.IMPLS[impl_name](B, N)
    state = {"i": 0}

    def step():
        rows, v, u, others = sets[state["i"] % len(sets)]
        state["i"] += 1
        for t in (*rows, s):
            t.grad = None
        fn(rows, v, u, others, s).backward()
    return step


def hide_step(fn, n, d):
    g = torch.Generator().manual_seed(0)
    sets = [losses.clip_like_pairs(n, d, torch.float32, DEVICE, g)[1].requires_grad_()
            for _ in range(3)]
    weight = torch.randn(n, d, device=DEVICE)
    state = {"i": 0}

    def step():
        u = sets[state["i"] % 3]
        state["i"] += 1
        u.grad = None
        (fn(u) * weight).sum().backward()
    return step


@contextlib.contextmanager
def triton_graphs(on: bool):
    """The triton backend on CUDA with a fresh graph cache (a key's route, backends' knobs
    included, is fixed when it is captured) or with no graphs, for a same-run comparison."""
    key = ("triton", "cuda")
    before = backends._BUILT.get(key)
    backends._BUILT[key] = backends.triton_impl(backends.triton_hide_ops("cuda"),
                                                stage_graphs.GraphCache() if on else None)
    try:
        yield
    finally:
        backends._BUILT[key] = before


def triton_hide(u):
    return himo_fast.hide(u, 0.9, backend="triton")


def _subspace_iteration_note(n, d, rounds):
    """The triton backend at N > d with its full solvers instead of subspace iteration
    (the same run's alternative), and whether the certificate held on this batch. A fresh
    graph cache: entries captured on the subspace route are not reused."""
    saved = backends.SUBSPACE_ITERATION_MAX
    backends.SUBSPACE_ITERATION_MAX = 0
    try:
        with triton_graphs(True):
            full = median_ms(hide_step(triton_hide, n, d), rounds)
    finally:
        backends.SUBSPACE_ITERATION_MAX = saved
    from himo_fast import pca
    from himo_fast.kernels.eigh import SMALL_MAX
    u = losses.clip_like_pairs(n, d, torch.float32, DEVICE, torch.Generator().manual_seed(0))[1]
    x = (u - u.mean(0)).double()
    small = pca.gram_or_cov(x, n <= d)
    ok = (bool(backends._triton_subspace(small, 0.9, n <= d).partial.ok)
          if SMALL_MAX < small.shape[0] <= saved else None)
    return (f"triton with the full solvers instead of subspace iteration (syevd, eager: "
            f"graphs do not apply there) {full:.3f} ms; certificate held: {ok}")


def hide_table(quick: bool, rounds: int, rows: list):
    d = 64 if quick else 768
    small, large = (32, 96) if quick else (128, 1024)
    auto = backends.select("auto", DEVICE).name
    # Each GPU backend side by side: they differ in HiDe's eigensolver (cuda: syevd;
    # triton: kernels.tridiagonal_eigh up to 256², subspace iteration up to 1024²), which
    # auto should follow.
    others = [b for b in ("cuda", "triton") if CUDA and b != auto
              and b in himo_fast.available_backends(DEVICE)]
    for n, goal in ((small, 0.25), (large, 1.5)):
        ours = median_ms(hide_step(lambda u: himo_fast.hide(u, 0.9), n, d), rounds)
        svd = median_ms(hide_step(lambda u: official_hide(u, 0.9), n, d), rounds)
        alt = {b: median_ms(hide_step(lambda u: himo_fast.hide(u, 0.9, backend=b), n, d), rounds)
               for b in others}
        if "triton" in alt:  # it replays CUDA graphs: the same kernels eagerly beside it
            with triton_graphs(False):
                alt["triton without graphs"] = median_ms(hide_step(triton_hide, n, d), rounds)
        note = (f"authors' SVD HiDe {svd:.3f} ms ({svd / ours:.1f}x)"
                + "".join(f"; {b} {t:.3f} ms" for b, t in alt.items()))
        if "triton" in alt and n == large:
            note += "; " + _subspace_iteration_note(n, d, rounds)
        rows.append(row(f"HiDe fwd+bwd, N={n}, d={d} (auto: {auto})",
                        ours, f"<= {goal} ms", ours <= goal, "ms", note))
    dtype = torch.bfloat16 if CUDA else torch.float32
    b, cols = (16, 128) if quick else (128, 1024)
    for name, (B, N), goal in (("paper-rank", (b, cols), 30.0), ("single-1k", (cols, cols), 20.0)):
        ours = median_ms(loss_step("himo_fast", B, N, d, dtype), rounds)
        theirs = median_ms(loss_step("official", B, N, d, dtype), rounds)
        alt = {}
        if "triton" in others:
            alt["triton"] = median_ms(loss_step("himo_fast_triton", B, N, d, dtype), rounds)
            with triton_graphs(False):
                alt["triton without graphs"] = median_ms(
                    loss_step("himo_fast_triton", B, N, d, dtype), rounds)
        rows.append(row(f"{name} MoLo (B={B} vs N={N}, d={d}) vs the authors' loss",
                        theirs / ours, f">= {goal}x", theirs / ours >= goal, "x",
                        f"{ours:.3f} ms vs {theirs:.3f} ms"
                        + "".join(f"; {b} {t:.3f} ms ({theirs / t:.1f}x)" for b, t in alt.items())))
    graph_goal = "<= 1.0x eager"
    if CUDA:
        from himo_fast.train import train_step
        loss = himo_fast.MoLo(backend="triton")
        scale = torch.tensor(100.0, device="cuda", requires_grad=True)
        # N = 128: HiDe's 128² Gram matrix, the tridiagonal solver eagerly and in the graph;
        # N = 1024: the 768² covariance by subspace iteration, eagerly and captured.
        for n in (b, cols):
            a = SimpleNamespace(n=n, d=d, steps=max(rounds, 3), device="cuda", tau=0.9)
            med = {}
            for kind, steps in (("eager", step_timing._eager_steps),
                                ("graph", step_timing._graph_steps)):
                _, _, times = steps(loss, a, torch.bfloat16, scale, torch.Generator().manual_seed(0))
                med[kind] = statistics.median(times[1:]) * 1e3
            ratio = med["graph"] / med["eager"]
            rows.append(row(f"CUDA-graph step vs eager, N={n}, d={d}, bf16 (triton)", ratio,
                            graph_goal, ratio <= 1.0, "x",
                            f"graph {med['graph']:.2f} ms, eager {med['eager']:.2f} ms"))
        step = loss_step("himo_fast", cols, cols, d, dtype)
        step()  # warm-up: first-call work (compiles, workspace queries) is not the step's
        _sync()
        syncs = train_step.host_syncs(step)
        rows.append(row("host syncs in a MoLo step (auto backend, set_sync_debug_mode)", syncs,
                        "0", syncs == 0))
    else:
        rows.append(missing("CUDA-graph step vs eager, N=128", graph_goal, "needs CUDA"))
        rows.append(missing("CUDA-graph step vs eager, N=1024", graph_goal, "needs CUDA"))
        rows.append(missing("host syncs in a MoLo step", "0", "needs CUDA"))


def hide_profiles(quick: bool):
    """Where one HiDe forward+backward's time goes (eigh_probe.kernel_times), per backend
    and N of hide_table: the kernels by total time, their launch count and sum."""
    from eigh_probe import kernel_times
    d, sizes = (64, (32, 96)) if quick else (768, (128, 1024))
    names = ([b for b in ("cuda", "triton") if b in himo_fast.available_backends(DEVICE)]
             if CUDA else ["auto"])
    out = []
    for n in sizes:
        for b in names:
            kernels = kernel_times(hide_step(lambda u: himo_fast.hide(u, 0.9, backend=b), n, d))
            out.append(dict(n=n, d=d, backend=b, launches=sum(k[1] for k in kernels),
                            total_us=round(sum(k[1] * k[2] for k in kernels), 1),
                            kernels=kernels[:15]))
    return out


def peak_extra_bytes(step, inputs_and_grads: int) -> int:
    """Allocator peak of one call beyond what was allocated before it and the gradients."""
    step()
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    _sync()
    return torch.cuda.max_memory_allocated() - base - inputs_and_grads


def infonce_table(quick: bool, rounds: int, rows: list):
    """Each MoLo dual InfoNCE path (auto's; on CUDA also the fused Triton tiles of the
    triton backend and the cuda backend's fused CUDA C++ tiles) against ClipLoss and
    Inf-CL, same inputs, same run."""
    d = 64 if quick else 768
    n = 256 if quick else 65536
    dtype = torch.bfloat16 if CUDA else torch.float32
    # impl of benchmarks/test_losses.py -> (backend, the cuda backend's route or None)
    paths = {"himo_fast": (backends.select("auto", DEVICE).name, None)}
    if "himo_fast_triton" in losses.IMPLS:
        paths["himo_fast_triton"] = ("triton", None)
    if "himo_fast_cuda_tiles" in losses.IMPLS and "cuda" in himo_fast.available_backends(DEVICE):
        paths["himo_fast_cuda_tiles"] = ("cuda", "tiles")
    clip = median_ms(loss_step("clip_loss", n, n, d, dtype), rounds)
    try:
        import inf_cl  # noqa: F401
        inf = median_ms(loss_step("inf_cl", n, n, d, dtype), rounds) if CUDA else None
    except ImportError:
        inf = None
    # Useful FLOPs: per branch one logit product forward and two backward (2·N²·width
    # each; a recompute is not useful work); the component branch at width m+1.
    m = int(himo_fast.reference.component_count(losses._inputs(n, n, torch.float32, d)[0][2].cpu(), 0.9))
    flops = 3 * 2 * n * n * (d + m + 1)
    peak = next((p for k, p in BF16_PEAK.items() if CUDA and k in torch.cuda.get_device_name()), None)
    big = 1024 if quick else 262144
    b, cols = (16, 128) if quick else (128, 1024)
    replays = {}
    for impl_name, (backend, route) in paths.items():
        who = f"MoLo ({backend}{' ' + route if route else ''})"
        ours = median_ms(loss_step(impl_name, n, n, d, dtype), rounds)
        rows.append(row(f"N={n}, d={d}: {who} vs ClipLoss (one branch)", ours / clip, "<= 1.0x",
                        ours / clip <= 1.0, "x", f"{ours:.2f} ms vs {clip:.2f} ms"))
        if inf is not None:
            rows.append(row(f"N={n}: {who} vs Inf-CL (one branch)", ours / inf, "<= 1.3x",
                            ours / inf <= 1.3, "x", f"{ours:.2f} ms vs {inf:.2f} ms"))
        else:
            rows.append(missing(f"N={n}: {who} vs Inf-CL (one branch)", "<= 1.3x",
                                "needs CUDA and the inf_cl wheel"))
        tflops = flops / (ours * 1e-3) / 1e12
        rows.append(row(f"useful throughput at N={n} (m={m}), {who}", tflops,
                        ">= 50% of dense bf16 peak", None if peak is None else tflops >= 0.5 * peak,
                        "TFLOP/s", "" if peak is None else f"{100 * tflops / peak:.0f}% of {peak} TFLOP/s"))
        if CUDA:
            step = loss_step(impl_name, big, big, d, dtype)
            grads = 2 * big * d * torch.finfo(dtype).bits // 8
            try:
                extra = peak_extra_bytes(step, grads) / 2**30
                rows.append(row(f"N={big}: extra memory beyond inputs and gradients, {who}", extra,
                                "<= 2 GiB, and it runs", extra <= 2.0, "GiB"))
            except torch.cuda.OutOfMemoryError:
                rows.append(row(f"N={big}: extra memory, {who}", None, "<= 2 GiB, and it runs",
                                False, note="out of memory"))
            del step
            torch.cuda.empty_cache()
        else:
            rows.append(missing(f"N={big}: extra memory beyond inputs and gradients",
                                "<= 2 GiB, and it runs", "needs CUDA (allocator statistics)"))
        impl = backends.select(backend, DEVICE)
        (vl, ul), v, u, others = losses._inputs(b, cols, dtype, d)[0]
        comp = impl.reconstruction(ul, 0.9).to(dtype).detach().requires_grad_()
        all_v, all_u = torch.cat([v[: cols - b], vl]), torch.cat([u[: cols - b], ul])
        all_c = torch.cat([others.to(dtype), comp])
        s = torch.tensor(100.0, device=DEVICE, requires_grad=True)

        # (bound now: the replays below run after the loop has moved on)
        def infonce(impl=impl, route=route, pairs=((vl, ul), (vl, comp)),
                    gathered=((all_v, all_u), (all_v, all_c))):
            with backends.cuda_route(route) if route else contextlib.nullcontext():
                g, c = impl.dual_infonce(pairs, gathered, s, cols - b, 0.1)
            (g + c).backward()
        t = median_ms(infonce, rounds)
        rows.append(row(f"paper-rank InfoNCE part ({b} x {cols}, both branches), {who}", t,
                        "<= 0.1 ms", t <= 0.1, "ms"))
        replays[who] = infonce
    # Eagerly that part is launch-bound (tens of launches); replayed as one CUDA graph it
    # costs what the device does. Last, since a capture that fails can spoil the process.
    for who, step in replays.items():
        name = f"paper-rank InfoNCE part, CUDA-graph replay, {who}"
        if not CUDA:
            rows.append(missing(name, "<= 0.1 ms", "needs CUDA"))
            continue
        try:
            t = median_ms(step_timing.capture(step)[0].replay, rounds)
            rows.append(row(name, t, "<= 0.1 ms", t <= 0.1, "ms"))
        except Exception as e:  # not capturable: say why
            rows.append(row(name, None, "<= 0.1 ms", False, note=f"capture failed: {e}"[:200]))


def col_grad_table(quick: bool, rounds: int, rows: list):
    """The cuda backend's square dual InfoNCE (bf16, the strips route, d = 768, component
    width 65) by col_grad: "recompute" against "accumulate", time and memory, where
    csrc/dual_infonce_cuda.cu's cost model puts the switch (it recomputes below 256 rows
    a strip: N > 131072)."""
    from himo_fast.dual_infonce import dual_infonce
    from meta_memory import cuda_auto_col_grad
    goal = "faster where auto recomputes only"
    if not CUDA or "cuda" not in himo_fast.available_backends(DEVICE):
        rows.append(missing("dual InfoNCE fwd+bwd, col_grad recompute vs accumulate", goal,
                            "needs CUDA and the cuda backend"))
        return
    d, width = 768, 65
    for n in ((4096,) if quick else (262144, 131072)):  # the goal's size first
        g = torch.Generator(device=DEVICE).manual_seed(0)
        feats = [torch.nn.functional.normalize(
            torch.randn(n, w, device=DEVICE, generator=g), dim=-1).to(torch.bfloat16).requires_grad_()
            for w in (d, d, width, width)]
        s = torch.tensor(20.0, device=DEVICE, requires_grad=True)
        measured = {}
        for col_grad in ("accumulate", "recompute"):
            def step(col_grad=col_grad):
                for t in (*feats, s):
                    t.grad = None
                gl, cl = dual_infonce(((feats[0], feats[1]), (feats[2], feats[3])), None, s, 0,
                                      0.1, kernel_dtype=torch.bfloat16, col_grad=col_grad)
                (gl + cl).backward()
            grads = sum(t.numel() * 2 for t in feats)
            measured[col_grad] = (median_ms(step, rounds), peak_extra_bytes(step, grads) / 2**20)
            torch.cuda.empty_cache()
        (ta, ma), (tr, mr) = measured["accumulate"], measured["recompute"]
        _, recomputes = cuda_auto_col_grad(n)
        rows.append(row(f"N={n}, d={d}: dual InfoNCE fwd+bwd, col_grad recompute / accumulate",
                        tr / ta, goal, (tr < ta) if recomputes else (tr >= ta), "x",
                        f"{tr:.1f} vs {ta:.1f} ms; extra memory {mr:.0f} vs {ma:.0f} MiB; "
                        f"auto {'recomputes' if recomputes else 'accumulates'}"))


def line(r) -> str:
    value = "n/a" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
    met = {True: "yes", False: "NO", None: "-"}[r["met"]]
    return f"{r['measure']:<72} {value:>12} {r['goal']:>26}  {met}  {r['note']}"


class LiveRows(list):
    """A table's rows, each printed and written to the JSON as soon as it is measured, so
    that a run cut off at its time limit (a device call's) keeps what it measured."""

    def __init__(self, info, path=None):
        super().__init__()
        self.info, self.path = info, path

    def append(self, r):
        super().append(r)
        print(line(r), flush=True)
        self.save()

    def save(self, profiles=()):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(dict(info=self.info, rows=list(self), profiles=list(profiles)), f,
                          indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", choices=["hide", "infonce", "col_grad"])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="timed runs per measure (median)")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--profile", action="store_true", help="hide: also where each HiDe "
                   "fwd+bwd's time goes, kernel by kernel (device time on CUDA)")
    a = p.parse_args(argv)
    rounds = a.rounds or (2 if a.quick else 10)
    info = dict(table=a.table, quick=a.quick, device=torch.cuda.get_device_name() if CUDA else "cpu",
                torch=torch.__version__, cuda=torch.version.cuda,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                command=" ".join(["python benchmarks/goals.py"] + (argv or sys.argv[1:])))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(info))
    rows = LiveRows(info, a.json)
    tables = dict(hide=hide_table, infonce=infonce_table, col_grad=col_grad_table)
    tables[a.table](a.quick, rounds, rows)
    print(f"\n{'measure':<72} {'value':>12} {'goal':>26}  met")
    for r in rows:
        print(line(r))
    profiles = hide_profiles(a.quick) if a.profile and a.table == "hide" else []
    for pr in profiles:
        print(f"HiDe fwd+bwd N={pr['n']} d={pr['d']} {pr['backend']}: {pr['total_us']:.0f} us "
              f"in {pr['launches']} launches; largest (name, launches, us each): {pr['kernels']}")
    rows.save(profiles)
    return list(rows)


if __name__ == "__main__":
    main()
