"""The one dispatch point: (backend name, device type, dtype) -> the implementation of
each stage, fallbacks included. Nothing else in the package looks at devices: the ops'
kernels are routed by the dispatcher (csrc/ops.cpp registers them per dispatch key), and
the stages below take what differs (the eigensolver, the kernels' dtype, whether the
forward keeps its logits) as arguments chosen here.

    MoLo / hide ──select(name, device)──► Impl(hide_factors, dual_infonce)
        hide_factors:  centre → PCA (eigh chosen here) → factors      (factors.py, pca.py)
        dual_infonce:  ops.dual_ce (C++/CUDA strips), ops.fused_dual_ce (Triton
                       tiles), or the reference                       (dual_infonce.py)

Backends: ``reference`` (pure PyTorch, differentiable to any order), ``cpu`` (the
compiled dual InfoNCE, csrc/), ``cuda`` (its CUDA twin), ``triton`` (HiDe and the fused
dual InfoNCE on the Triton kernels of himo_fast.kernels, on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1).
``select`` picks one for a device: an explicit name, else $HIMO_FAST_BACKEND, else the
first usable one in ``AUTO_ORDER``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension, graphs as stage_graphs, ops, pca, reference, subspace_iteration
from .dual_infonce import dual_infonce as compiled_dual_infonce
from .factors import TORCH_OPS, HiDeOps, hide_factors, hide_reconstruction, materialize

ENV_VAR = "HIMO_FAST_BACKEND"
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# The CPU forward keeps its logits for the backward (which then skips their recompute, a
# quarter of its work) when all of them fit in this many elements: 8 MiB in fp32, N=1024
# square or 128 rows against 1024 columns; a constant, so memory stays O(N·d). Not on GPUs,
# where the recompute is cheap against the memory.
CPU_LOGITS_KEPT = 1 << 21
# cuSOLVER's XsyevBatched runs inside a CUDA-graph capture up to this size: 128, 256 and
# 512 captured on an H100, 768 and 1024 did not (benchmarks/eigh_probe.py, 2026-11-23).
SYEV_BATCHED_CAPTURE_MAX = 512
# Above that, while capturing, the tridiagonal solver with its grid reduction (2 launches a
# reduction step; kernels/eigh.py) up to its size limit, then Jacobi. Not measured yet on a
# GPU: predicted ≈ 7-8 ms at 768 as a graph, against Jacobi's 230 ms (benchmarks/README.md).
TRIDIAGONAL_CAPTURE_MAX = 1024
# The triton backend's PCA above kernels.eigh.SMALL_MAX up to this size, eagerly and while
# capturing: subspace iteration with every decision on the device (subspace_iteration.py),
# the full solve (the tridiagonal solver's one-program reduction, its launches predicated
# on the device) where the certificate fails. Not measured on a GPU yet: predicted ≈ 3 ms
# for HiDe fwd+bwd at N=1024, d=768 eagerly, against syevd's 11.8 ms, and ≈ 25 ms where the
# certificate fails (benchmarks/README.md). Setting it to 256 (kernels.eigh.SMALL_MAX) turns
# it off: the full solvers of _capturable_eigh then.
SUBSPACE_ITERATION_MAX = 1024
# The triton backend on CUDA replays HiDe and the fused dual InfoNCE, forward and backward,
# from CUDA graphs captured once per shape, dtype and constants (graphs.py), up to
# graphs.MAX_ELEMENTS input elements: eagerly they are host-bound at the recipe's sizes
# (HiDe alone ≈ 90 dispatches at 128 x 768, ≈ 520 at 1024 x 768). $HIMO_FAST_GRAPHS=0
# turns it off. Not measured on a GPU yet.
GRAPHS = os.environ.get("HIMO_FAST_GRAPHS", "1") != "0"
# The cuda backend's route for bf16/fp16 features (ops.dual_ce): "strips" (cuBLAS strips
# of fp32 logits; measured on an H100, 2026-11-22) or "tiles" (csrc/dual_infonce_tiles_cuda.cu:
# tensor-core tiles, no logits in memory; written 2026-12-07 without a GPU, not yet run on
# one). $HIMO_FAST_CUDA_ROUTE picks; benchmarks/gpu_check.sh validates and times both.
# fp32 features always take the strips (the tiles are for tensor-core inputs).
def _route(value: str, source: str) -> str:
    if value not in ("strips", "tiles"):
        raise ValueError(f"{source} must be 'strips' or 'tiles', got {value!r}")
    return value


CUDA_ROUTE = _route(os.environ.get("HIMO_FAST_CUDA_ROUTE", "strips"), "$HIMO_FAST_CUDA_ROUTE")


@dataclass(frozen=True)
class Impl:
    """One backend on one device type."""

    name: str
    hide_factors: Callable  # (u, tau) -> factors.Factors
    dual_infonce: Callable  # (rows, cols, scale, label_offset, label_smoothing) -> (global, comp)
    # (u, tau, dtype=None) -> u' for N > d, fused (factors.hide_reconstruction), where the
    # backend's factors are masked
    hide_reconstruction: Callable | None = None

    def fuses_reconstruction(self, u: torch.Tensor) -> bool:
        """Whether u' comes from the fused op: the backend has it and N > d, where masked
        factors are d wide (Z = X̂, B = Π), so never the cheaper form for the loss."""
        return self.hide_reconstruction is not None and u.shape[0] > u.shape[1]

    def reconstruction(self, u: torch.Tensor, tau: float) -> torch.Tensor:
        """u' = X̂Π + ū: fused where it can be, else the factors materialized."""
        if self.fuses_reconstruction(u):
            return self.hide_reconstruction(u, tau)
        return materialize(self.hide_factors(u, tau))


@dataclass(frozen=True)
class Backend:
    name: str
    build: Callable[[str], "Impl | str"]  # device type -> its Impl, or why it cannot run there


# ---------------------------------------------------------------- the stages per device

def _cpu_dual_infonce(rows, cols, scale, label_offset=0, label_smoothing=0.0, strip_rows=0):
    b = rows[0][0].shape[0]
    n = b if cols is None else cols[0][0].shape[0]
    kept = math.prod(ops.kept_logits_shape(b, n, cols is None))
    return compiled_dual_infonce(rows, cols, scale, label_offset, label_smoothing,
                                 keep_logits=kept <= CPU_LOGITS_KEPT, strip_rows=strip_rows)


@contextlib.contextmanager
def cuda_route(route: str):
    """CUDA_ROUTE inside the block: the cuda backend's bf16/fp16 dual InfoNCE by "strips"
    or "tiles" (the benchmarks time both in one process). A backward takes the route of
    its forward, saved with it."""
    global CUDA_ROUTE
    before, CUDA_ROUTE = CUDA_ROUTE, _route(route, "route")
    try:
        yield
    finally:
        CUDA_ROUTE = before


def _cuda_dual_infonce(rows, cols, scale, label_offset=0, label_smoothing=0.0, strip_rows=0):
    dtype = rows[0][0].dtype
    if dtype == torch.float64:  # the CUDA kernels have no float64 (it is for gradcheck there)
        return reference.dual_infonce_reference(rows, cols, scale, label_offset, label_smoothing)
    # bf16/fp16 stay narrow for the tensor cores; the op accumulates in fp32.
    route = CUDA_ROUTE if dtype in (torch.bfloat16, torch.float16) else "strips"
    return compiled_dual_infonce(rows, cols, scale, label_offset, label_smoothing,
                                 kernel_dtype=dtype, strip_rows=strip_rows, route=route)


def _hide_cpu(u, tau):
    # On the CPU reading m costs nothing, so the factors are cut to their exact size (the
    # component branch then has width m+1). Under torch.compile the fixed-size masked
    # factors keep the graph free of data-dependent shapes.
    return hide_factors(u, tau, sliced=not torch.compiler.is_compiling())


def sync_free_eigh(a):
    """torch.linalg.eigh without its host read of the solver's status, where built."""
    return ops.sym_eigh(a) if ops.SYM_EIGH_ON_CUDA else torch.linalg.eigh(a)


@functools.lru_cache(maxsize=None)
def _prepare_for_capture(device: torch.device, k: int) -> None:
    """Run the solver a capture of a k x k problem would use once, eagerly: a Triton
    kernel's first launch (compile, module load) and cuSOLVER's parameter set and
    workspace query then never happen inside a capture."""
    from . import kernels
    if ops.SYM_EIGH_ON_CUDA and k <= SYEV_BATCHED_CAPTURE_MAX:
        ops.sym_eigh(torch.eye(2, device=device, dtype=torch.float64), "syev_batched")
    elif k <= TRIDIAGONAL_CAPTURE_MAX:
        kernels.tridiagonal_eigh(torch.eye(k, device=device, dtype=torch.float64))
    else:
        kernels.jacobi_eigh(torch.eye(2, device=device, dtype=torch.float64), sweeps=1)


@functools.lru_cache(maxsize=None)
def _warn_slow_capture(k: int) -> None:
    warnings.warn(
        f"himo_fast: HiDe captured in a CUDA graph with a {k} x {k} Gram/covariance matrix "
        "uses the Jacobi eigensolver, which is exact but slow above "
        f"{TRIDIAGONAL_CAPTURE_MAX} (≈ 230 ms at 768 on an H100, against 8 ms for the eager "
        "syevd): leave the loss outside the captured region there.", stacklevel=3)


def _capturable_eigh(a):
    """The triton backend's eigensolver on CUDA. Up to kernels.eigh.SMALL_MAX (the
    per-rank Gram matrix of the paper's recipe, 128²): the Triton tridiagonal solver,
    eagerly and while capturing (sync-free, capturable, no cuSOLVER latency). Above it:
    syevd (sync-free) eagerly; while the current stream is capturing a graph (nothing
    else torch or cuSOLVER ships captures), XsyevBatched up to SYEV_BATCHED_CAPTURE_MAX,
    the tridiagonal solver's grid reduction up to TRIDIAGONAL_CAPTURE_MAX, Jacobi above."""
    from . import kernels
    k = a.shape[0]
    if k <= kernels.eigh.SMALL_MAX:
        return kernels.tridiagonal_eigh(a)
    if torch.cuda.is_current_stream_capturing():
        if ops.SYM_EIGH_ON_CUDA and k <= SYEV_BATCHED_CAPTURE_MAX:
            return ops.sym_eigh(a, "syev_batched")
        if k <= TRIDIAGONAL_CAPTURE_MAX:
            return kernels.tridiagonal_eigh(a)
        _warn_slow_capture(k)
        return kernels.jacobi_eigh(a)
    _prepare_for_capture(a.device, k)
    return sync_free_eigh(a)


def _predicated_full_eigh(a, run):
    from . import kernels
    return kernels.tridiagonal_eigh(a, reduction="program", run=run)


def _top_subspace(small, tau, gram):
    from . import kernels
    return subspace_iteration.top_subspace(
        small, tau, gram, kernels.tridiagonal_eigh, _predicated_full_eigh,
        steps=subspace_iteration.Steps(kernels.filter_start, kernels.filter_step,
                                       kernels.cg_update, kernels.cg_direction))


@functools.lru_cache(maxsize=None)
def _prepare_top_subspace(device: torch.device, k: int) -> None:
    """_prepare_for_capture for _top_subspace: both branches' kernels (an identity fails
    the certificate: the full solve runs), the start block, cuSOLVER's Cholesky."""
    _top_subspace(torch.eye(k, device=device, dtype=torch.float64), 0.9, False)


def _subspace_iteration_applies(k: int, tau: float) -> bool:
    """Whether _triton_subspace takes a k x k matrix at τ by subspace iteration: above
    kernels.eigh.SMALL_MAX up to SUBSPACE_ITERATION_MAX, where τ <=
    subspace_iteration.TAU_MAX (above it the block rarely holds the cutoff)."""
    from . import kernels
    return (kernels.eigh.SMALL_MAX < k <= SUBSPACE_ITERATION_MAX
            and tau <= subspace_iteration.TAU_MAX)


def _triton_subspace(small, tau, gram):
    """The triton backend's PCA on CUDA: subspace iteration where
    _subspace_iteration_applies, else the full decomposition (_capturable_eigh)."""
    k = small.shape[0]
    if _subspace_iteration_applies(k, tau):
        if not (small.is_cuda and torch.cuda.is_current_stream_capturing()):
            _prepare_top_subspace(small.device, k)
        return _top_subspace(small, tau, gram)
    return pca.full_subspace(small, tau, gram, _capturable_eigh)


def _pca_captures_well(k: int, tau: float) -> bool:
    """Whether _triton_subspace on a k x k matrix at τ is as fast in a CUDA graph (its
    stages' graphs) as eagerly: where both run the same route (the Triton solver up to
    kernels.eigh.SMALL_MAX, subspace iteration where it applies), and up to
    SYEV_BATCHED_CAPTURE_MAX, where the captured XsyevBatched ran at syevd's speed (H100,
    2026-11-23). Elsewhere eagerly syevd runs, and what captures is slower (Jacobi,
    ≈ 230 ms at 768) or not measured (the grid reduction, predicted about even at 768)."""
    from . import kernels
    return (k <= kernels.eigh.SMALL_MAX or _subspace_iteration_applies(k, tau)
            or (ops.SYM_EIGH_ON_CUDA and k <= SYEV_BATCHED_CAPTURE_MAX))


def triton_hide_ops(kind: str, eigh: Callable | None = None,
                    subspace: Callable | None = None) -> HiDeOps:
    """HiDe's primitives on the Triton kernels, with the eigensolver for this device type:
    on CUDA ``_triton_subspace``; on CPU tensors (the interpreter) LAPACK's full eigh, since
    the interpreted Triton solver takes seconds a call (tests/test_kernels.py tests it, and
    tests/test_hide_triton.py and tests/test_subspace_iteration.py HiDe with it, by passing
    ``eigh`` or ``subspace``)."""
    from . import kernels  # triton is imported only when this backend runs
    graphable = None
    if eigh is None and subspace is None and kind == "cuda":
        eigh, subspace, graphable = _capturable_eigh, _triton_subspace, _pca_captures_well
    return HiDeOps(kernels.centre, kernels.gram_or_cov, kernels.product,
                   eigh or torch.linalg.eigh, subspace, graphable)


def triton_impl(kernel_ops: HiDeOps, graphs: stage_graphs.GraphCache | None = None) -> Impl:
    """Masked factors and a sync-free eigh: nothing in HiDe reads the device on the host
    (so its stages capture); the fused dual InfoNCE keeps no logits, and takes every
    dtype in its own precision (bf16/fp16 for the tensor cores; fp32 accumulation, fp64
    for fp64). Both stages from ``graphs`` where given."""
    def dual_infonce(rows, cols, scale, label_offset=0, label_smoothing=0.0):
        return compiled_dual_infonce(rows, cols, scale, label_offset, label_smoothing,
                                     kernel_dtype=rows[0][0].dtype, fused=True, graphs=graphs)

    return Impl("triton",
                lambda u, tau: hide_factors(u, tau, sliced=False, ops=kernel_ops, graphs=graphs),
                dual_infonce,
                lambda u, tau, dtype=None: hide_reconstruction(u, tau, kernel_ops, graphs, dtype))


# ---------------------------------------------------------------- the backends

def _build_reference(kind: str):
    return Impl("reference", reference.hide_factors_reference, reference.dual_infonce_reference)


def _build_cpu(kind: str):
    if kind != "cpu":
        return "runs on cpu tensors only"
    return _extension.unavailable_reason(need_cuda=False) or Impl("cpu", _hide_cpu, _cpu_dual_infonce)


def _build_cuda(kind: str):
    if kind != "cuda":
        return "runs on cuda tensors only"
    masked = HiDeOps(*TORCH_OPS[:3], sync_free_eigh)
    return _extension.unavailable_reason(need_cuda=True) or Impl(
        "cuda", lambda u, tau: hide_factors(u, tau, sliced=False, ops=masked), _cuda_dual_infonce,
        lambda u, tau, dtype=None: hide_reconstruction(u, tau, masked, dtype=dtype))


def _build_triton(kind: str):
    # CUDA tensors on a GPU; CPU tensors only through Triton's interpreter (CI's way to
    # test the kernels). TRITON_INTERPRET is read when the kernels are first imported.
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "runs on CPU tensors only under TRITON_INTERPRET=1"
    if kind not in ("cpu", "cuda"):
        return f"runs on cuda tensors (or cpu under TRITON_INTERPRET=1), not {kind}"
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    graphs = stage_graphs.GraphCache() if kind == "cuda" and GRAPHS else None
    return triton_impl(triton_hide_ops(kind), graphs)


_REGISTRY = {b.name: b for b in (Backend("reference", _build_reference), Backend("cpu", _build_cpu),
                                 Backend("cuda", _build_cuda), Backend("triton", _build_triton))}


_BUILT: dict = {}  # (name, device type) -> Impl or reason; a plain dict, which Dynamo traces


def _impl(name: str, kind: str):
    """The backend's Impl on this device type, or the reason it cannot run there."""
    key = (name, kind)
    if key not in _BUILT:
        _BUILT[key] = ("no CUDA device is available"
                       if kind == "cuda" and not torch.cuda.is_available()
                       else _REGISTRY[name].build(kind))
    return _BUILT[key]


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type


def no_autocast(t: torch.Tensor):
    """open_clip trains under autocast; the loss runs in (at least) float32 regardless: a
    half-precision PCA or log-sum-exp would not meet SPEC section 4. (Meta tensors, for
    shape propagation, have no autocast to turn off.)"""
    kind = _device_type(t)
    if kind == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def known_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def available_backends(device) -> list[str]:
    """Names of the backends that can run on ``device`` (a device, string or tensor)."""
    kind = _device_type(device)
    return [name for name in _REGISTRY if isinstance(_impl(name, kind), Impl)]


def check_name(backend: str) -> None:
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {known_backends()}, got {backend!r}")


def select(backend: str, device) -> Impl:
    """The implementation to run on ``device``; raises if an explicitly named one cannot."""
    kind = _device_type(device)
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend == "auto":
            for name in AUTO_ORDER.get(kind, ("reference",)):
                impl = _impl(name, kind)
                if isinstance(impl, Impl):
                    return impl
            impl = _impl("reference", kind)
            if isinstance(impl, Impl):
                return impl
            raise ValueError(f"nothing can run on {kind} tensors here: {impl}")
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if backend not in _REGISTRY:
        raise ValueError(f"{source} must be 'auto' or one of {known_backends()}, got {backend!r}")
    impl = _impl(backend, kind)
    if not isinstance(impl, Impl):
        raise ValueError(f"{source}={backend!r} cannot run on {kind} tensors: {impl}")
    return impl
