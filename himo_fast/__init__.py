"""himo_fast: HiMo-CLIP's HiDe + MoLo objective, fast, exact and robust."""
from .backends import available_backends
from .loss import MoLo, hide

__version__ = "0.1.0"
__all__ = ["MoLo", "hide", "available_backends", "__version__"]
