"""The package's open_clip model configs (HiMo-Tiny, HiMo-Demo; himo_fast/train/
model_configs) known to open_clip by name as soon as both are imported, in either order,
without importing open_clip (2 s) for users who do not use it."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "train" / "model_configs"


def register() -> None:
    """Make the package's model configs known to open_clip by name (once)."""
    import open_clip
    if "HiMo-Tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds open_clip as the path finder would, and registers the configs once its
    module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        sys.meta_path.remove(self)  # once; from here on open_clip imports normally
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "open_clip" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
