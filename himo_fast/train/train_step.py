"""What MoLo costs in a real open_clip training step: ``python -m himo_fast.bench train-step``.

open_clip's own model and step (forward, loss, backward, AdamW step; open_clip_train's
autocast for ``amp_bf16``) on generated images and texts, with (a) open_clip's ClipLoss,
(b) ``himo_fast.MoLo`` on the ``auto`` backend (and, on a GPU, ``molo-triton``: the
``triton`` backend's fused dual InfoNCE), (c) the authors' loss (tests/official.py,
where the source tree is at hand). For each: samples/s, the step time's median and spread
(p10-p90), peak memory above the start of the step, and the host syncs per step that
torch sees (CUDA: ``torch.cuda.set_sync_debug_mode``; "n/a" on the CPU, where there is no
device to wait for). Printed as a table, written as JSON.

Configurations (``--config``): ``cpu`` HiMo-Tiny at batch 128 fp32 (quick); on a GPU
``b16`` ViT-B-16 at 256 amp_bf16, ``l14-long`` ViT-L-14 at 128 with 248-token texts (the
paper's per-rank recipe: 128 local rows against 8 x 128 gathered columns, the other
ranks' features simulated by fixed random ones), ``b16-max`` ViT-B-16 at the largest
power-of-two batch that fits, per loss (does MoLo's O(N·d) loss memory let a larger one
fit?).
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {
    "cpu": dict(model="HiMo-Tiny", batch=128, precision="fp32", ranks=1, context=None),
    "b16": dict(model="ViT-B-16", batch=256, precision="amp_bf16", ranks=1, context=None),
    "l14-long": dict(model="ViT-L-14", batch=128, precision="amp_bf16", ranks=8, context=248),
    "b16-max": dict(model="ViT-B-16", batch=None, precision="amp_bf16", ranks=1, context=None),
}
LOSSES = ("clip", "molo", "official")
# On a GPU also MoLo on the triton backend (its fused dual InfoNCE), beside auto's choice.
GPU_LOSSES = LOSSES + ("molo-triton",)


def _official():
    """tests/official.py (the authors' loss, transcribed): importable as ``official`` (put
    tests/ on PYTHONPATH), or found in the source tree this package runs from."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    if (tests / "official.py").exists() and str(tests) not in sys.path:
        sys.path.append(str(tests))
    try:
        import official
    except ImportError:
        return None
    return official


def _loss_fn(name: str, others):
    """(image, text, scale) -> scalar loss. ``others``: fixed (image, text) features of
    the simulated other ranks (this rank's rows are the last slice), or None."""
    import himo_fast
    from himo_fast import backends
    if name == "clip":
        from open_clip.loss import ClipLoss
        clip = ClipLoss()
        if others is None:
            return clip

        def clip_local(v, u, s):  # ClipLoss's math with local_loss: local rows, all columns
            all_v, all_u = torch.cat([others[0], v]), torch.cat([others[1], u])
            labels = torch.arange(all_v.shape[0] - v.shape[0], all_v.shape[0], device=v.device)
            return 0.5 * (F.cross_entropy(s * v @ all_u.T, labels)
                          + F.cross_entropy(s * u @ all_v.T, labels))
        return clip_local
    if name in ("molo", "molo-triton"):
        backend = "triton" if name == "molo-triton" else "auto"
        if others is None:
            return himo_fast.MoLo(backend=backend)

        def molo_local(v, u, s):  # MoLo's local-loss recipe, one rank, gather simulated
            impl = backends.select(backend, v)
            with backends.no_autocast(v):
                v, u = v.float(), u.float()
                comp = impl.reconstruction(u, 0.9)
                n_other = others[0].shape[0]
                all_v, all_u = torch.cat([others[0], v]), torch.cat([others[1], u])
                all_c = torch.cat([others[2], comp])
                g, c = impl.dual_infonce(((v, u), (v, comp)), ((all_v, all_u), (all_v, all_c)),
                                         s, n_other, 0.1)
            return g + c
        return molo_local
    official = _official()
    if official is None:
        return None

    def authors(v, u, s):
        with torch.autocast(device_type=v.device.type, enabled=False):
            v, u = v.float(), u.float()
            if others is None:
                return sum(official.official_loss(v, u, s))
            comp = official.official_hide(u, 0.9)
            all_v, all_u = torch.cat([others[0], v]), torch.cat([others[1], u])
            return sum(official.official_loss(
                v, u, s, all_image=all_v, all_text=all_u, all_comp=torch.cat([others[2], comp]),
                comp=comp, rank=others[0].shape[0] // v.shape[0]))
    return authors


def host_syncs(fn) -> int:
    """Runs fn once on CUDA and returns the host synchronisations torch reported in it
    (``torch.cuda.set_sync_debug_mode("warn")``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _peak_start(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    return _rss("VmRSS")


def _peak_end(device, base):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss("VmHWM") - base


def _rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def measure(config: str, loss_name: str, device, steps: int, warmup: int, progress=None,
            batch: int | None = None) -> dict:
    import open_clip
    cfg = dict(CONFIGS[config])
    batch = batch or cfg["batch"]
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": intended
    torch.manual_seed(0)
    model = open_clip.create_model(cfg["model"], output_dict=True).to(device)
    if cfg["context"]:
        from .long_text import stretch_model
        stretch_model(model, cfg["context"])
    ctx = model.positional_embedding.shape[0] if hasattr(model, "positional_embedding") else 77
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, 1000, (batch, ctx), device=device)
    others = None
    if cfg["ranks"] > 1:
        d = model.text_projection.shape[1]
        mk = lambda: F.normalize(torch.randn((cfg["ranks"] - 1) * batch, d, device=device), dim=-1)
        others = (mk(), mk(), mk())
    loss_fn = _loss_fn(loss_name, others)
    if loss_fn is None:
        return {"config": config, "loss": loss_name,
                "skipped": "tests/official.py not found (put the source tree's tests/ on PYTHONPATH)"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if cfg["precision"] == "amp_bf16" else torch.autocast(device.type, enabled=False))

    def step():
        with autocast:
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    times, syncs, peak = [], 0, 0
    for i in range(steps):
        base = _peak_start(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            syncs += host_syncs(step)
        else:
            step()
        peak = max(peak, _peak_end(device, base))
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    median = statistics.median(times)
    return {"config": config, "loss": loss_name, "model": cfg["model"], "batch": batch,
            "precision": cfg["precision"], "columns": batch * cfg["ranks"],
            "median_s": median, "p10_s": q(0.1), "p90_s": q(0.9), "samples_per_s": batch / median,
            "peak_mib": peak / 2**20,
            "host_syncs_per_step": syncs / steps if device.type == "cuda" else None}


def largest_batch(loss_name: str, device, start: int = 256, limit: int = 1 << 15) -> int:
    """b16-max: the largest power-of-two batch whose step fits in memory with this loss."""
    fits, batch = 0, start
    while batch <= limit:
        try:
            measure("b16-max", loss_name, device, steps=1, warmup=1, batch=batch)
            fits, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return fits


def run(configs, losses, device, steps, warmup, out: Path | None) -> list[dict]:
    from tqdm import tqdm
    if device.type == "cuda":  # what open_clip_train's main() sets before it trains
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    # A discarded run first: the process's first measured loss was ≈ 15 % slower, whichever
    # it was (allocator growth, thread pools), on the CPU.
    first = next((c for c in configs if c != "b16-max"), None)
    if first is not None:
        measure(first, "clip", device, steps=1, warmup=warmup)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
            f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)}
    rows = []
    for config in configs:
        for loss in losses:
            if config == "b16-max":
                rows.append({"config": config, "loss": loss, "model": "ViT-B-16",
                             "largest_batch": largest_batch(loss, device)})
            else:
                with tqdm(total=steps, desc=f"{config} {loss}", unit="step") as bar:
                    rows.append(measure(config, loss, device, steps, warmup, bar))
            if out is not None:  # after every row: a run cut off keeps what it measured
                out.write_text(json.dumps({"train_step": rows, **meta}, indent=1))
    print(table(rows))
    if out is not None:
        print(f"wrote {out}")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| config | loss | batch | step (median) | p10-p90 | samples/s | vs ClipLoss | peak MiB | host syncs/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["config"]: r["median_s"] for r in rows if r.get("loss") == "clip" and "median_s" in r}
    for r in rows:
        if "largest_batch" in r:
            lines.append(f"| {r['config']} | {r['loss']} | largest that fits: {r['largest_batch']} |"
                         " | | | | | |")
            continue
        if "median_s" not in r:
            lines.append(f"| {r.get('config', '')} | {r.get('loss', '')} | {r.get('skipped', '')} | | | | | | |")
            continue
        ratio = r["median_s"] / base[r["config"]] if r["config"] in base else float("nan")
        syncs = "n/a" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.1f}"
        lines.append(f"| {r['config']} | {r['loss']} | {r['batch']} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['p10_s'] * 1e3:.1f}-{r['p90_s'] * 1e3:.1f} ms | {r['samples_per_s']:.0f} | "
                     f"{ratio:.3f}x | {r['peak_mib']:.0f} | {syncs} |")
    return "\n".join(lines)
