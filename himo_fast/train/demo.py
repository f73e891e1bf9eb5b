"""``python -m himo_fast.demo``: MoLo against ClipLoss on a generated hierarchical dataset.

Generates the shapes dataset (himo_fast.train.shapes_dataset), trains open_clip's HiMo-Tiny CLIP with
``python -m himo_fast.train`` once with MoLo and once with plain ClipLoss for the same
steps and seed, for each of a few seeds, then reports on held-out pairs: image<->text
Recall@1 and HiMo@2/3 (strict monotonic accuracy, %) and HiMo@4 (mean Pearson), per seed
and as mean ± std over the seeds. Whatever the numbers are, they are what they are.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import metrics, shapes_dataset

MODEL = "HiMo-Tiny"


def train_run(data: Path, logs: Path, name: str, loss: str, seed: int, epochs: int,
              batch_size: int, extra=()) -> Path:
    cmd = [sys.executable, "-m", "himo_fast.train", "--train-data", str(data),
           "--dataset-type", "csv", "--csv-separator", "\t", "--model", MODEL,
           "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", "1e-3",
           "--warmup", "5", "--workers", "0", "--seed", str(seed), "--precision", "fp32",
           "--device", "cpu", "--logs", str(logs), "--name", name, "--himo-loss", loss,
           "--log-every-n-steps", "1000", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    ckpt = logs / name / "checkpoints" / f"epoch_{epochs}.pt"
    if out.returncode != 0 or not ckpt.exists():
        raise RuntimeError(f"training run {name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return ckpt


@torch.no_grad()
def evaluate(ckpt: Path, pairs: list[tuple[str, str]]) -> dict:
    import open_clip
    from PIL import Image

    from .command import register_model_configs

    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    images = torch.stack([preprocess(Image.open(p)) for p, _ in pairs])
    img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)

    def text(captions):
        return torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)

    full = text([c for _, c in pairs])
    out = {"R@1 i2t": metrics.recall_at_k(img, full, (1,))["image_to_text_R@1"],
           "R@1 t2i": metrics.recall_at_k(img, full, (1,))["text_to_image_R@1"]}
    for k in (2, 3, 4):
        scores = torch.stack([(img * text([metrics.prefixes(c, k)[i] for _, c in pairs])).sum(-1)
                              for i in range(k)], 1)
        out[f"HiMo@{k}"] = metrics.himo_at_k(scores)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m himo_fast.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("himo_demo"))
    p.add_argument("--train-size", type=int, default=1280)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    train_csv = shapes_dataset.write_split(a.out, "train", a.train_size, seed=1000)
    val_csv = shapes_dataset.write_split(a.out, "val", a.val_size, seed=2000)
    val = shapes_dataset.read_split(val_csv)
    results = {"molo": [], "clip": []}
    runs = [(seed, loss) for seed in a.seeds for loss in ("molo", "clip")]
    for seed, loss in tqdm(runs, desc="training runs", unit="run"):
        ckpt = train_run(train_csv, a.out / "logs", f"{loss}-seed{seed}", loss, seed, a.epochs,
                         a.batch_size)
        results[loss].append({"seed": seed, **evaluate(ckpt, val)})
    keys = [k for k in results["molo"][0] if k != "seed"]
    steps = a.epochs * (a.train_size // a.batch_size)
    print(f"\n{MODEL}, {a.train_size} train / {a.val_size} held-out pairs, {steps} steps of "
          f"{a.batch_size}, seeds {a.seeds}")
    print(f"{'loss':<6} {'seed':>4} " + " ".join(f"{k:>13}" for k in keys))
    for loss, rows in results.items():
        for r in rows:
            print(f"{loss:<6} {r['seed']:>4} " + " ".join(f"{r[k]:>13.3f}" for k in keys))
    for loss, rows in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rows]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.2f}±{sd:.2f}".rjust(13))
        print(f"{loss:<6} {'mean':>4} " + " ".join(cells))
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"(R@1 and HiMo@2/3 in %, HiMo@4 a Pearson correlation; raw numbers in {a.out / 'results.json'})")


if __name__ == "__main__":
    main()
