"""himo_fast: HiMo-CLIP's HiDe + MoLo objective, fast, exact and robust."""
from . import _open_clip_configs
from .backends import available_backends
from .loss import MoLo, hide

_open_clip_configs.install()  # open_clip.create_model("HiMo-Tiny") works after import himo_fast

__version__ = "0.1.0"
__all__ = ["MoLo", "hide", "available_backends", "__version__"]
