"""The one dispatch point: which implementation computes HiDe and the dual InfoNCE.

A backend is a pair of functions with the reference's signatures:
``hide_factors(u, tau) -> Factors`` (HiDe: centring, PCA, the reconstruction as factors)
and ``dual_infonce(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale,
label_offset, label_smoothing) -> (global, comp)``. ``select`` picks one for a
device: an explicit name, else $HIMO_FAST_BACKEND, else the first usable one in
``AUTO_ORDER``. Nothing else in the package looks at devices.

Backends: ``reference`` (pure PyTorch), ``cpu`` (the compiled dual InfoNCE, csrc/),
``cuda`` (its CUDA twin), ``triton`` (HiDe on the Triton kernels of himo_fast.kernels and
the sync-free eigh, on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension, dual_infonce, reference
from .reconstruct import hide_factors

ENV_VAR = "HIMO_FAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    hide_factors: Callable
    dual_infonce: Callable
    # Returns None when usable on that device type, else the reason it is not.
    unavailable: Callable[[str], str | None]


_REGISTRY: dict[str, Backend] = {}
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _only_on(device_type: str, need_cuda: bool):
    def unavailable(kind: str) -> str | None:
        if kind != device_type:
            return f"runs on {device_type} tensors only"
        return _extension.unavailable_reason(need_cuda=need_cuda)
    return unavailable


def _triton_unavailable(kind: str) -> str | None:
    # CUDA tensors on a GPU; CPU tensors only through Triton's interpreter (CI's way to
    # test the kernels). TRITON_INTERPRET is read when the kernels are first imported.
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "runs on CPU tensors only under TRITON_INTERPRET=1"
    if kind not in ("cpu", "cuda"):
        return f"runs on cuda tensors (or cpu under TRITON_INTERPRET=1), not {kind}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _hide_factors_triton(u, tau):
    from . import kernels  # triton is imported only when this backend runs
    # Masked factors and the full eigh without its info read: nothing here reads the
    # device on the host. Subspace iteration (partial=True) is not used: its block policy
    # reads Ritz values (benchmarks/test_hide.py times it as `subspace_iteration`).
    return hide_factors(u, tau, sliced=False, ops=kernels.OPS)


def _dual_infonce_compiled_or_reference(*args, **kwargs):
    # The Triton backend's own kernels are HiDe's; the dual InfoNCE is the compiled one
    # where the extension is built and takes the dtype (the CUDA kernels have no float64:
    # float64 on a GPU is for gradcheck, not speed), else the reference.
    x = args[0]
    compiled = _extension.unavailable_reason(need_cuda=x.is_cuda) is None
    if compiled and not (x.is_cuda and x.dtype == torch.float64):
        return dual_infonce.dual_infonce(*args, **kwargs)
    return reference.dual_infonce_reference(*args, **kwargs)


def _hide_factors_masked(u, tau):
    # The fused first-order HiDe over the fixed-size masked basis: no host sync.
    return hide_factors(u, tau, sliced=False)


def _hide_factors_cpu(u, tau):
    # On the CPU reading m costs nothing, so the factors are cut to their exact size (the
    # component branch then has width m+1). Under torch.compile the fixed-size masked
    # factors keep the graph free of data-dependent shapes. The full eigh, not subspace
    # iteration: on 2 cores MKL's eigh wins at every measured size (benchmarks/README.md).
    return hide_factors(u, tau, sliced=not torch.compiler.is_compiling())


register(Backend("reference", reference.hide_factors_reference, reference.dual_infonce_reference,
                 lambda device_type: None))
# Compiled dual InfoNCE (csrc/): the C++ tile algorithm on CPU, its CUDA twin on GPUs.
register(Backend("cpu", _hide_factors_cpu, dual_infonce.dual_infonce,
                 _only_on("cpu", need_cuda=False)))
register(Backend("cuda", _hide_factors_masked, dual_infonce.dual_infonce,
                 _only_on("cuda", need_cuda=True)))
# Triton HiDe kernels (kernels/): centring, Gram/covariance, the factor products.
register(Backend("triton", _hide_factors_triton, _dual_infonce_compiled_or_reference,
                 _triton_unavailable))


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type


def known_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _no_device(kind: str) -> str | None:
    """Why nothing at all can run on this device type here (None when something can)."""
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def available_backends(device) -> list[str]:
    """Names of the backends that can run on ``device`` (a device, string or tensor)."""
    kind = _device_type(device)
    if _no_device(kind) is not None:
        return []
    return [name for name, b in _REGISTRY.items() if b.unavailable(kind) is None]


def check_name(backend: str) -> None:
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {known_backends()}, got {backend!r}")


def select(backend: str, device) -> Backend:
    """The backend to run on ``device``; raises if an explicitly named one cannot."""
    kind = _device_type(device)
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend == "auto":
            for name in AUTO_ORDER.get(kind, ("reference",)):
                if name in _REGISTRY and _REGISTRY[name].unavailable(kind) is None:
                    return _REGISTRY[name]
            return _REGISTRY["reference"]
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if backend not in _REGISTRY:
        raise ValueError(f"{source} must be 'auto' or one of {known_backends()}, got {backend!r}")
    why = _no_device(kind) or _REGISTRY[backend].unavailable(kind)
    if why is not None:
        raise ValueError(f"{source}={backend!r} cannot run on {kind} tensors: {why}")
    return _REGISTRY[backend]
