"""The applications around the loss: open_clip training with MoLo (``python -m
himo_fast.train``), the demo (``python -m himo_fast.demo``) and its generated dataset, the
Long-CLIP text stretch, the retrieval and HiMo@K metrics, and the benchmark tools
(``python -m himo_fast.bench``, ``python -m himo_fast``). The core (himo_fast) does not
import them; the training command's names load open_clip only when first used."""

_COMMAND = ("himo_parser", "main", "make_loss", "register_model_configs")


def __getattr__(name):
    if name in _COMMAND:
        from . import command
        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_COMMAND)
