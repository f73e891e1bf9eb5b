"""Does MoLo raise HiMo@K in the demo's setting, and why or why not? Runs the demo
(himo_fast.train.demo) once per variant, both losses on the same seeds, and prints the
paired differences MoLo - ClipLoss (mean and 95 % t-interval over seeds) as a Markdown
table, for the README. Each variant's results.json goes to OUT/VARIANT/.

    python benchmarks/demo_ablation.py --out benchmarks/results/demo-ablation [--seeds 0 1 2]
    python benchmarks/demo_ablation.py --out ... --table-only   # re-print from the files
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from himo_fast.train import demo

# name -> (folder, extra demo flags). "recipe" is the main job (the authors' tau, lam, eps).
VARIANTS = {
    "recipe (τ=0.9, λ=1, ε=0.1)": ("recipe", []),
    "λ=0 (global branch only, ε=0.1)": ("lam0", ["--lam", "0"]),
    "ε=0 (no label smoothing)": ("eps0", ["--label-smoothing", "0"]),
    "τ=0.5": ("tau0.5", ["--tau", "0.5"]),
    "τ=0.99": ("tau0.99", ["--tau", "0.99"]),
    "batch 32 (same samples: 640 steps)": ("batch32", ["--batch-size", "32", "--steps", "640",
                                                        "--eval-every", "128"]),
    "320 steps": ("steps320", ["--steps", "320", "--eval-every", "64"]),
    "sentences shuffled in training": ("shuffled", ["--shuffle-sentences"]),
}


def folder(out: Path, name: str) -> Path:
    return out / VARIANTS[name][0]


def table(out: Path) -> str:
    rows = ["| variant | " + " | ".join(f"{k} MoLo − ClipLoss [95 % CI]" for k in demo.METRICS)
            + " | MoLo R@1 | ClipLoss R@1 | seeds |",
            "|---|" + "---|" * (len(demo.METRICS) + 3)]
    for name in VARIANTS:
        path = folder(out, name) / "results.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        final = {loss: {k: [run["history"][-1][k] for run in runs] for k in demo.METRICS}
                 for loss, runs in r["runs"].items()}
        cells = []
        for k in demo.METRICS:
            ci = demo.paired(final["molo"][k], final["clip"][k])
            digits = 3 if k == "HiMo@4" else 1
            cells.append(f"{ci['mean']:+.{digits}f} [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]")
        mean = lambda v: sum(v) / len(v)
        rows.append(f"| {name} | " + " | ".join(cells) +
                    f" | {mean(final['molo']['R@1']):.1f} | {mean(final['clip']['R@1']):.1f}"
                    f" | {len(final['molo']['R@1'])} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    if not a.table_only:
        for name, (_, flags) in VARIANTS.items():
            if a.only and name not in a.only:
                continue
            print(f"== {name}", flush=True)
            demo.main(["--out", str(folder(a.out, name)), "--seeds", *map(str, a.seeds), *flags])
    print(table(a.out))


if __name__ == "__main__":
    main()
