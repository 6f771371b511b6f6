"""Accuracy of the large-batch fast recipe against the published batch-64 recipe, on the same teacher.

    python benchmarks/fast_recipe_check.py --out runs/fast_check [--seeds 0 1 2] [--batch 256] [--data digits]

Trains the digits KD recipe (recipes/digits/kd.yaml) as published (batch 64, lr 0.05) and as the fast
recipe (batch B, lr 0.05 * B / 64, a linear warm-up, teacher cache, graph step, BN-folded teacher)
for each seed, then prints top-1 (last epoch) mean +- std and writes fast_recipe_check.json in --out.
On a GPU pass a CIFAR-100 pair instead: --recipe recipes/cifar100/bench240/resnet56_resnet20/kd.yaml.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from kdlab import pipeline
from kdlab.checkpoint import atomic_write_text
from kdlab.recipe_files import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def fast_overrides(batch: int, base_batch: int, base_lr: float, warmup_epochs: float) -> list[str]:
    return [
        f"train.batch_size={batch}",
        f"train.lr={base_lr * batch / base_batch:g}",
        f"train.schedule.warmup_epochs={warmup_epochs:g}",
        "train.teacher_cache=true",
        "train.fast.graph_step=true",
        "train.fast.fold_teacher=true",
        # the teacher keeps the published protocol: the same teacher for both arms
        f"teachers.0.train.batch_size={base_batch}",
        f"teachers.0.train.lr={base_lr:g}",
        "teachers.0.train.schedule.warmup_epochs=0",
        "teachers.0.train.fast.graph_step=false",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fast_recipe_check")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "digits" / "kd.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    base = load_recipe(args.recipe, args.overrides)
    arms = {
        f"batch {base.train.batch_size} (published)": [],
        f"batch {args.batch} fast": fast_overrides(
            args.batch, base.train.batch_size, base.train.lr, args.warmup_epochs
        ),
    }
    rows = []
    t0 = time.perf_counter()
    for arm, extra in arms.items():
        for seed in args.seeds:
            recipe = load_recipe(args.recipe, [f"cache_dir={out / 'teachers'}", *args.overrides, *extra], seed=seed)
            run_dir = out / arm.split(" (")[0].replace(" ", "_") / f"seed{seed}"
            started = time.perf_counter()
            resume = (run_dir / "config.yaml").exists()
            result = pipeline.run(None if resume else recipe, run_dir, resume=resume, quiet=True)
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "top1_last": result["top1_last"],
                    "top1_best": result["top1_best"],
                    "wall_seconds": result.get("wall_seconds", round(time.perf_counter() - started, 1)),
                }
            )
            print(f"{arm:<26} seed {seed}: top-1 last {result['top1_last']:.2f}")
    summary = {}
    for arm in arms:
        accs = [r["top1_last"] for r in rows if r["arm"] == arm]
        summary[arm] = {
            "mean": round(statistics.mean(accs), 2),
            "std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
            "n": len(accs),
        }
        print(
            f"{arm:<26} top-1 (last epoch) {summary[arm]['mean']:.2f} +- {summary[arm]['std']:.2f} "
            f"over {len(accs)} seeds"
        )
    recipe_path = Path(args.recipe).resolve()
    shown = str(recipe_path.relative_to(ROOT)) if recipe_path.is_relative_to(ROOT) else args.recipe
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
        "recipe": shown,
        "overrides": args.overrides,
        "fast_overrides": arms[list(arms)[1]],
        "rows": rows,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fast_recipe_check.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'fast_recipe_check.json'}")


if __name__ == "__main__":
    main()
