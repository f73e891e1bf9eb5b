"""Argument checking (SPEC section 4): every bad argument is refused before any work,
with a ValueError/TypeError naming the argument and the offending value."""
from __future__ import annotations

import numbers

import torch

from .pca import compute_dtype

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
PCA_SCOPES = ("local", "global")


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return value


def _int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_tau(tau):
    tau = _real("tau", tau)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    return tau


def check_config(*, tau, lam, label_smoothing, local_loss, gather_with_grad, cache_labels,
                 rank, world_size, pca_scope, backend):
    """Validates MoLo's constructor arguments; returns them normalised."""
    lam = _real("lam", lam)
    if lam < 0.0 or lam == float("inf"):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    eps = _real("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps!r}")
    world_size = _int("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    rank = _int("rank", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if pca_scope not in PCA_SCOPES:
        raise ValueError(f"pca_scope must be one of {PCA_SCOPES}, got {pca_scope!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r} ({type(backend).__name__})")
    return dict(
        tau=check_tau(tau), lam=lam, label_smoothing=eps,
        local_loss=_bool("local_loss", local_loss),
        gather_with_grad=_bool("gather_with_grad", gather_with_grad),
        cache_labels=_bool("cache_labels", cache_labels),
        rank=rank, world_size=world_size, pca_scope=pca_scope, backend=backend,
    )


def check_features(name, t, *, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype in {FLOAT_DTYPES}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if like is not None:
        other, other_name = like
        if t.shape != other.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != {other_name} shape {tuple(other.shape)}")
        if t.dtype != other.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != {other_name} dtype {other.dtype}")
        if t.device != other.device:
            raise ValueError(f"{name} device {t.device} != {other_name} device {other.device}")
    return t


def check_scalar_tensor(name, t, features):
    """The scale or bias as a tensor: a tensor as given (0-d or one element, on the
    features' device), or a Python real number, as open_clip's ClipLoss accepts."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return torch.tensor(float(t), dtype=compute_dtype(features.dtype), device=features.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (0-d or 1 element) or a real number, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{name} must be 0-d or have exactly one element, got shape {tuple(t.shape)}")
    if t.device != features.device:
        raise ValueError(f"{name} device {t.device} != image_features device {features.device}")
    return t
