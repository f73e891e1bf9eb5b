"""``python -m himo_fast.train``: open_clip's own training entry point with MoLo as its loss.

Every open_clip_train flag works as documented there (data, model, optimiser, precision,
``--local-loss``, ``--gather-with-grad``, torchrun/DDP, checkpoints, logs). Added flags:

  --himo-loss {molo,clip}     MoLo (default) or open_clip's plain ClipLoss, for comparison
  --himo-tau, --himo-lambda, --himo-label-smoothing, --himo-pca-scope, --himo-backend
  --himo-long-text L          Long-CLIP positions: stretch a 77-position text tower to L
                              (248 in the paper) and tokenize to L tokens

Wrap, don't fork: the loss, model and tokenizer factories that open_clip_train.main looks
up are replaced for the duration of the run; its training loop is untouched. Needs the
training extras of open_clip (webdataset, pandas, braceexpand, fsspec).
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from .._open_clip_configs import register as register_model_configs
from ..loss import MoLo
from .long_text import stretch_model


def himo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--himo-loss", choices=["molo", "clip"], default="molo")
    p.add_argument("--himo-tau", type=float, default=0.9)
    p.add_argument("--himo-lambda", type=float, default=1.0)
    p.add_argument("--himo-label-smoothing", type=float, default=0.1)
    p.add_argument("--himo-pca-scope", choices=["local", "global"], default="local")
    p.add_argument("--himo-backend", default="auto")
    p.add_argument("--himo-long-text", type=int, default=None, metavar="L")
    return p


def make_loss(himo: argparse.Namespace, args) -> MoLo:
    """MoLo with open_clip's distributed settings (as its create_loss builds ClipLoss)."""
    return MoLo(tau=himo.himo_tau, lam=himo.himo_lambda,
                label_smoothing=himo.himo_label_smoothing, local_loss=args.local_loss,
                gather_with_grad=args.gather_with_grad, cache_labels=True, rank=args.rank,
                world_size=args.world_size, pca_scope=himo.himo_pca_scope,
                backend=himo.himo_backend)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        himo_parser().print_help()
    himo, rest = himo_parser().parse_known_args(argv)
    register_model_configs()
    try:
        from open_clip_train import main as oc_main
    except ImportError as exc:
        raise SystemExit(f"python -m himo_fast.train needs open_clip's training extras ({exc}); "
                         "pip install 'webdataset<=0.2.86' pandas braceexpand fsspec") from exc

    patched = {}
    if himo.himo_loss == "molo":
        patched["create_loss"] = lambda args: make_loss(himo, args)
    if himo.himo_long_text:
        if any(a.startswith("--force-context-length") for a in rest):
            raise SystemExit("--himo-long-text and --force-context-length are exclusive")
        create, tokenizer = oc_main.create_model_and_transforms, oc_main.get_tokenizer

        @functools.wraps(create)
        def create_long(*a, **kw):
            model, *transforms = create(*a, **kw)
            stretch_model(getattr(model, "module", model), himo.himo_long_text)
            return (model, *transforms)

        patched["create_model_and_transforms"] = create_long
        patched["get_tokenizer"] = functools.partial(_tokenizer, tokenizer, himo.himo_long_text)
    saved = {name: getattr(oc_main, name) for name in patched}
    ddp = torch.nn.parallel.DistributedDataParallel
    try:
        for name, fn in patched.items():
            setattr(oc_main, name, fn)
        # open_clip_train passes device_ids=[device] to DDP, which DDP refuses for CPU
        # modules: multi-process CPU (gloo) training needs device_ids=None.
        torch.nn.parallel.DistributedDataParallel = _cpu_safe_ddp(ddp)
        oc_main.main(rest)
    finally:
        for name, fn in saved.items():
            setattr(oc_main, name, fn)
        torch.nn.parallel.DistributedDataParallel = ddp


def _cpu_safe_ddp(ddp):
    def make(module, *args, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return ddp(module, *args, device_ids=device_ids, **kwargs)
    return make


def _tokenizer(get_tokenizer, length, name, *args, **kwargs):
    kwargs["context_length"] = length
    return get_tokenizer(name, *args, **kwargs)


if __name__ == "__main__":
    main()
