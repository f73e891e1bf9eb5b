"""``python -m himo_fast.demo``: MoLo against open_clip's ClipLoss, paired over seeds, on a
generated hierarchical image-caption dataset.

Trains open_clip's ``HiMo-Demo`` CLIP from scratch (32 px ViT and text tower, 2 layers of
width 128 each; himo_fast/train/model_configs) once with each loss for every seed: same
initial weights, same batches, same steps. Every ``--eval-every`` steps it scores the
held-out pairs: Recall@1 (the mean of image->text and text->image, %), HiMo@2 and HiMo@3
(strict monotonic accuracy, %) and HiMo@4 (mean Pearson correlation), the paper's §4.2
protocol on captions whose sentences add detail level by level
(himo_fast.train.shapes_dataset). Prints each loss's mean, the paired difference MoLo -
ClipLoss with its 95 % t-interval, chance levels and a conclusion line; writes
results.json and curves.png into ``--out`` (nothing else is written).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import metrics, shapes_dataset

METRICS = ("R@1", "HiMo@2", "HiMo@3", "HiMo@4")
# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (then ≈ normal).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
PRESETS = {  # the main job on 2 CPU cores (8 min), and a larger run for a GPU
    "cpu": dict(device="cpu", model="HiMo-Demo", train_size=8192, val_size=256, steps=160,
                batch_size=128, eval_every=32, seeds=[0, 1, 2, 3, 4]),
    "gpu": dict(device="cuda", model="HiMo-Tiny", train_size=65536, val_size=1024, steps=2000,
                batch_size=256, eval_every=200, seeds=[0, 1, 2, 3, 4]),
}


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns that a model without pretrained weights is initialised randomly:
    here that is the point (training from scratch), not a problem."""

    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


def chance_levels(val_size: int) -> dict:
    """What a model that knows nothing scores: R@1 = 1/N; HiMo@2 = 1/2 and HiMo@3 = 1/6
    (a random order is increasing with those odds); HiMo@4 = 0 (no correlation)."""
    return {"R@1": 100.0 / val_size, "HiMo@2": 50.0, "HiMo@3": 100.0 / 6, "HiMo@4": 0.0}


def make_split(n: int, seed: int, px: int, shuffle_sentences: bool = False):
    """n generated (image tensor, caption) pairs; ``shuffle_sentences`` puts each caption's
    sentences in a random order (the ablation without the hierarchy in training)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    rng = random.Random(seed)
    scenes = [shapes_dataset.random_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(shapes_dataset.render(s, rng, px)) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    captions = [s.caption() for s in scenes]
    if shuffle_sentences:
        captions = [" ".join(rng.sample(metrics.sentences(c), len(metrics.sentences(c))))
                    for c in captions]
    return (images - mean) / std, captions


@torch.no_grad()
def evaluate(model, tokenizer, images, captions, device) -> dict:
    model.eval()
    img = torch.nn.functional.normalize(model.encode_image(images.to(device)), dim=-1).cpu()
    prefix_lists = {k: [metrics.prefixes(c, k) for c in captions] for k in (2, 3, 4)}
    # Each text once: the prefixes of different K share most of their texts.
    unique = list(dict.fromkeys([*captions, *(t for lists in prefix_lists.values()
                                               for lst in lists for t in lst)]))
    encoded = {}
    for i in range(0, len(unique), 1024):
        chunk = unique[i:i + 1024]
        feats = model.encode_text(tokenizer(chunk).to(device)).cpu()
        encoded.update(zip(chunk, feats))
    encode = lambda texts: torch.stack([encoded[t] for t in texts])
    txt = torch.nn.functional.normalize(encode(captions), dim=-1)
    r = metrics.recall_at_k(img, txt, (1,))
    out = {"R@1": (r["image_to_text_R@1"] + r["text_to_image_R@1"]) / 2}
    for k, lists in prefix_lists.items():
        out[f"HiMo@{k}"] = metrics.himo_at_k(metrics.prefix_scores(img, lists, encode))
    model.train()
    return out


def make_loss(name: str, a):
    if name == "molo":
        import himo_fast
        return himo_fast.MoLo(tau=a.tau, lam=a.lam, label_smoothing=a.label_smoothing)
    from open_clip.loss import ClipLoss
    return ClipLoss()


def train_run(loss_name: str, seed: int, train, val, a, progress) -> list[dict]:
    """One training run; the held-out metrics at every evaluation step."""
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.create_model(a.model).to(a.device)
    tokenizer = open_clip.get_tokenizer(a.model)
    tokens = tokenizer(train[1])
    loss_fn = make_loss(loss_name, a)
    # open_clip_train's grouping: no weight decay on gains, biases, embeddings, the scale.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98))
    order = torch.Generator().manual_seed(seed)  # the same batches for both losses
    perm, pos = torch.randperm(len(tokens), generator=order), 0
    # Step 0 too: what the untrained model scores (HiMo@K is far from chance there).
    history = [{"step": 0, **evaluate(model, tokenizer, *val, a.device)}]
    for step in range(a.steps):
        scale = min(1.0, (step + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        if pos + a.batch_size > len(perm):
            perm, pos = torch.randperm(len(tokens), generator=order), 0
        idx = perm[pos:pos + a.batch_size]
        pos += a.batch_size
        image_features, text_features, logit_scale = model(train[0][idx].to(a.device),
                                                           tokens[idx].to(a.device))
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip_train does
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            history.append({"step": step + 1, **evaluate(model, tokenizer, *val, a.device)})
            progress.set_postfix(R1=f"{history[-1]['R@1']:.1f}", loss=f"{loss.item():.2f}")
        progress.update(1)
    return history


def paired(molo: list[float], clip: list[float]) -> dict:
    """Mean of the paired differences MoLo - ClipLoss and its 95 % t-interval."""
    d = [m - c for m, c in zip(molo, clip)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan")}
    t = T_975[len(d) - 2] if len(d) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(d) / math.sqrt(len(d))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def verdict(ci: dict) -> str:
    if not (ci["low"] == ci["low"]):
        return "one seed: no interval"
    if ci["low"] > 0:
        return "MoLo higher"
    if ci["high"] < 0:
        return "ClipLoss higher"
    return "no clear difference (the interval contains 0)"


def plot(results: dict, path: Path, chance: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, METRICS):
        for loss, colour in (("molo", "tab:red"), ("clip", "tab:blue")):
            runs = results["runs"].get(loss, [])
            if not runs:
                continue
            steps = [h["step"] for h in runs[0]["history"]]
            values = np.array([[h[key] for h in r["history"]] for r in runs])
            ax.plot(steps, values.mean(0), color=colour,
                    label={"molo": "MoLo", "clip": "ClipLoss"}[loss])
            ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15)
        ax.axhline(chance[key], color="gray", linestyle=":", label="chance")
        ax.set_title(key)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("held-out (mean over seeds, band: min-max)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m himo_fast.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="defaults for the rest (cpu: the main job, ≈ 8 min on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("himo_demo"),
                   help="folder for results.json and curves.png (default ./himo_demo)")
    for name, kind in (("device", str), ("model", str), ("train-size", int), ("val-size", int),
                       ("steps", int), ("batch-size", int), ("eval-every", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--losses", nargs="+", choices=("molo", "clip"), default=["molo", "clip"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1, help="MoLo's ε (ClipLoss: 0)")
    p.add_argument("--shuffle-sentences", action="store_true",
                   help="train on captions with their sentences in random order (ablation)")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    logging.getLogger().addFilter(_NoRandomInitWarning())
    import open_clip
    px = open_clip.get_model_config(a.model)["vision_cfg"]["image_size"]
    start = time.time()
    train = make_split(a.train_size, 1000, px, a.shuffle_sentences)
    val = make_split(a.val_size, 2000, px)
    chance = chance_levels(a.val_size)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    results = {"config": config, "chance": chance, "runs": {loss: [] for loss in a.losses}}
    print(f"{a.model} on {a.device}: {a.train_size} generated training pairs, {a.val_size} "
          f"held out; {a.steps} steps of {a.batch_size}; seeds {a.seeds}; "
          f"MoLo tau={a.tau} lam={a.lam} eps={a.label_smoothing}")
    for seed in a.seeds:
        for loss in a.losses:
            with tqdm(total=a.steps, desc=f"{loss:<4} seed {seed}", unit="step") as bar:
                history = train_run(loss, seed, train, val, a, bar)
            results["runs"][loss].append({"seed": seed, "history": history})
    final = {loss: {k: [r["history"][-1][k] for r in runs] for k in METRICS}
             for loss, runs in results["runs"].items()}
    print(f"\nheld-out after {a.steps} steps, mean over {len(a.seeds)} seeds "
          "(R@1, HiMo@2/3 in %, HiMo@4 a correlation):")
    print(f"{'':<18}" + "".join(f"{k:>17}" for k in METRICS))
    print(f"{'chance':<18}" + "".join(f"{chance[k]:>17.2f}" for k in METRICS))
    for loss in a.losses:
        label = {"molo": "MoLo", "clip": "ClipLoss"}[loss]
        print(f"{label:<18}" + "".join(f"{statistics.mean(final[loss][k]):>17.2f}" for k in METRICS))
    if set(a.losses) == {"molo", "clip"}:
        diffs = {k: paired(final["molo"][k], final["clip"][k]) for k in METRICS}
        results["paired_difference"] = diffs
        print(f"{'MoLo - ClipLoss':<18}" + "".join(f"{diffs[k]['mean']:>+17.2f}" for k in METRICS))
        interval = lambda ci: f"[{ci['low']:+.2f}, {ci['high']:+.2f}]"
        print(f"{'  95% interval':<18}" + "".join(f"{interval(diffs[k]):>17}" for k in METRICS))
        print("conclusion: " + "; ".join(f"{k}: {verdict(diffs[k])}" for k in METRICS))
    results["seconds"] = time.time() - start
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, a.out / "curves.png", chance)
    print(f"wrote {a.out / 'results.json'} and {a.out / 'curves.png'} "
          f"({results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
