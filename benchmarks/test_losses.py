"""Forward+backward throughput of himo_fast against its peers (SPEC section 5).

``pytest benchmarks/ --benchmark-only`` runs every workload that fits the device, grouped
per workload so that pytest-benchmark's table shows the implementations side by side.
HIMO_BENCH_QUICK=1 shrinks the shapes (CI runs that, so the suite cannot rot).
extra_info: samples/s, TFLOP/s counted as the official loss's logit matmuls
(2 branches x 2 directions x 2·B·N·d, x3 for forward+backward), peak extra memory.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import himo_fast
from himo_fast import backends
from himo_fast.synthetic import clip_like_pairs
from official import official_hide, official_loss

QUICK = os.environ.get("HIMO_BENCH_QUICK") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 64 if QUICK else 768
# (name, local rows B, columns N): columns = B on one rank; paper-rank gathers 8 ranks.
WORKLOADS = [("paper-rank", 32 if QUICK else 128, 256 if QUICK else 1024),
             ("single-1k", 128 if QUICK else 1024, 128 if QUICK else 1024)]
if DEVICE == "cuda" and not QUICK:
    WORKLOADS += [(f"large-{n // 1024}k", n, n) for n in (16384, 65536, 262144)]
ROTATE = 3  # input sets, rotated between rounds


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _inputs(B, N, dtype, d=None):
    sets = []
    g = torch.Generator().manual_seed(0)
    for _ in range(ROTATE):
        v, u = clip_like_pairs(N, d or D, dtype, DEVICE, g)
        # this rank's rows are the last slice of the gathered batch (label offset N - B)
        rows = [t[N - B:].clone().requires_grad_() for t in (v, u)]
        # The other ranks' components arrive by all_gather on a real rank: computed here,
        # once, outside the timed step (each rank runs HiDe on its own B texts only).
        others = official_hide(u[: N - B], 0.9) if N > B else None
        sets.append((rows, v, u, others))
    return sets


def _himo(B, N, tau=0.9, eps=0.1, backend="auto"):
    impl = backends.select(backend, DEVICE)
    if B == N:
        loss = himo_fast.MoLo(tau=tau, label_smoothing=eps, backend=backend)
        return lambda rows, v, u, others, s: loss(*rows, s)

    def step(rows, v, u, others, s):  # one rank of the local-loss recipe
        vl, ul = rows
        comp = impl.reconstruction(ul, tau)
        all_v = torch.cat([v[: N - B], vl])
        all_u = torch.cat([u[: N - B], ul])
        all_c = torch.cat([others, comp])
        g, c = impl.dual_infonce(((vl, ul), (vl, comp)), ((all_v, all_u), (all_v, all_c)), s, N - B, eps)
        return g + c
    return step


def _official(B, N, tau=0.9, eps=0.1):
    if B == N:
        return lambda rows, v, u, others, s: sum(official_loss(*rows, s, tau=tau, eps=eps))

    def step(rows, v, u, others, s):
        vl, ul = rows
        comp = official_hide(ul, tau)
        all_c = torch.cat([others, comp])
        return sum(official_loss(vl, ul, s, tau=tau, eps=eps, all_image=torch.cat([v[: N - B], vl]),
                                 all_text=torch.cat([u[: N - B], ul]), all_comp=all_c, comp=comp,
                                 rank=(N - B) // B))
    return step


def _clip(B, N, eps=0.0):
    def step(rows, v, u, others, s):  # open_clip ClipLoss's math (global branch only), local rows
        vl, ul = rows
        all_v, all_u = torch.cat([v[: N - B], vl]), torch.cat([u[: N - B], ul])
        labels = torch.arange(N - B, N, device=vl.device)
        return 0.5 * (F.cross_entropy(s * vl @ all_u.T, labels) + F.cross_entropy(s * ul @ all_v.T, labels))
    return step


def _inf_cl(B, N, both_branches=False):
    """Inf-CL (the field's memory-efficient contrastive loss, Triton, CUDA only). Its
    ``cal_inf_loss(q, k)`` is one direction (rows q against columns k), so a symmetric
    branch is two calls: ``inf_cl`` = the global branch (ClipLoss's objective, 2 calls),
    ``inf_cl_dual`` = both of MoLo's branches on the same inputs (4 calls; the component
    branch's texts are the other ranks' components plus this rank's HiDe, as for MoLo)."""
    from inf_cl import cal_inf_loss
    impl = backends.select("auto", DEVICE)

    def symmetric(rows_v, rows_t, all_v, all_t, s):
        if B == N:
            return 0.5 * (cal_inf_loss(rows_v, rows_t, scale=s) + cal_inf_loss(rows_t, rows_v, scale=s))
        # B local rows against N gathered columns: the labels are this rank's slice.
        labels = torch.arange(N - B, N, device=rows_v.device)
        return 0.5 * (cal_inf_loss(rows_v, all_t, labels=labels, scale=s)
                      + cal_inf_loss(rows_t, all_v, labels=labels, scale=s))

    def step(rows, v, u, others, s):
        vl, ul = rows
        all_v = torch.cat([v[: N - B], vl]) if N > B else vl
        all_u = torch.cat([u[: N - B], ul]) if N > B else ul
        loss = symmetric(vl, ul, all_v, all_u, s)
        if both_branches:
            comp = impl.reconstruction(ul, 0.9).to(vl.dtype)
            all_c = torch.cat([others.to(vl.dtype), comp]) if N > B else comp
            loss = loss + symmetric(vl, comp, all_v, all_c, s)
        return loss
    return step


def _cuda_tiles(B, N):
    """The cuda backend with its fused tile route (csrc/dual_infonce_tiles_cuda.cu) for
    the bf16 dual InfoNCE, instead of auto's strips."""
    step = _himo(B, N, backend="cuda")

    def run(*args):
        with backends.cuda_route("tiles"):  # the backward keeps its forward's route
            return step(*args)
    return run


IMPLS = {"himo_fast": _himo, "official": _official, "clip_loss": _clip}
if DEVICE == "cuda":
    # The fused dual InfoNCEs beside auto's strip driver: Triton tiles (kernels/infonce.py)
    # and CUDA C++ tiles.
    IMPLS["himo_fast_triton"] = lambda B, N: _himo(B, N, backend="triton")
    IMPLS["himo_fast_cuda_tiles"] = _cuda_tiles
    IMPLS["official_compiled"] = lambda B, N: torch.compile(_official(B, N))
    IMPLS["inf_cl"] = _inf_cl
    IMPLS["inf_cl_dual"] = lambda B, N: _inf_cl(B, N, both_branches=True)


def _peak_extra(fn):
    """Peak memory above the start of one call: CUDA allocator, or RSS (VmHWM) on Linux."""
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync()
        return torch.cuda.max_memory_allocated() - base
    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    base = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    fn()
    return kib("VmHWM") - base


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_forward_backward(benchmark, workload, impl):
    name, B, N = workload
    benchmark.group = f"{name} B={B} N={N} d={D} {DEVICE}"
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    if impl.startswith("inf_cl"):
        pytest.importorskip("inf_cl", reason="inf_cl travels as a wheel to the GPU machine")
    elif not impl.startswith("himo_fast") and N > 65536:
        pytest.skip(f"{impl} materialises N x N logits: out of memory at N={N} by construction")
    sets = _inputs(B, N, dtype)
    s = torch.tensor(100.0, device=DEVICE, requires_grad=True)
    fn = IMPLS[impl](B, N)
    state = {"i": 0}

    def step():
        rows, v, u, others = sets[state["i"] % ROTATE]
        state["i"] += 1
        for t in (*rows, s):
            t.grad = None
        fn(rows, v, u, others, s).backward()
        _sync()

    try:
        step()  # warm-up (and compile)
        peak = _peak_extra(step)
        benchmark.pedantic(step, rounds=3 if QUICK else 7, warmup_rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError:
        benchmark.extra_info["oom"] = True
        pytest.skip(f"{impl} ran out of memory at {name}")
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=B / t, tflops=24 * B * N * D / t / 1e12,
                                peak_extra_mib=peak / 2**20)
