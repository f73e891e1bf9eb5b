"""Loading the compiled extension ``himo_fast._C``, refusing a torch it was not built for.

A C++ extension built against one torch and loaded into another can crash or compute
garbage, so the torch version recorded at build time is compared before the library is
loaded. On a mismatch (or when nothing was compiled) the compiled backends are reported
unavailable with the reason, and asking for one by name raises with what to do.
"""
from __future__ import annotations

import importlib
import warnings

import torch

REBUILD_HINT = ("reinstall himo_fast against the torch you run: "
                "pip install --no-build-isolation --force-reinstall --no-deps .")

_state = {"loaded": None, "module": None, "reason": None}


def _load():
    try:
        from . import _build_info
    except ImportError:
        return None, "himo_fast was not compiled (no _build_info); " + REBUILD_HINT
    if _build_info.TORCH_VERSION != torch.__version__:
        reason = (f"himo_fast._C was built against torch {_build_info.TORCH_VERSION} "
                  f"but torch {torch.__version__} is running; " + REBUILD_HINT)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    try:
        module = importlib.import_module("himo_fast._C")
    except ImportError as exc:  # built info present but library missing or broken
        return None, f"himo_fast._C failed to load ({exc}); " + REBUILD_HINT
    return module, None


def extension():
    """The compiled module, or None (see ``unavailable_reason``)."""
    if _state["loaded"] is None:
        _state["module"], _state["reason"] = _load()
        _state["loaded"] = True
    return _state["module"]


def unavailable_reason(need_cuda: bool = False) -> str | None:
    """Why the compiled ops cannot run (None when they can)."""
    module = extension()
    if module is None:
        return _state["reason"]
    if need_cuda and not module.built_with_cuda():
        return "himo_fast._C was built without CUDA kernels; " + REBUILD_HINT
    return None
