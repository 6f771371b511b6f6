"""The FEED analysis table: reconstruction error of the last feature map of students trained by
vanilla, KD, FT, pFEED and sFEED (same architecture, same data), as the FEED paper compares them.

    python benchmarks/feed_recon.py --out runs/feed_recon [--epochs 12] [--set KEY=VALUE ...]

Trains (or reuses) the digits recipes of those methods, runs `kdlab analyze recon` on each student,
prints a table and writes feed_recon.json in --out. Pass --family cifar100 recipes with --recipes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdlab import pipeline
from kdlab.analysis.recon import analyze
from kdlab.checkpoint import atomic_write_text
from kdlab.recipe_files import load_recipe
from kdlab.tools.demo import recipe_dir

METHODS = ("vanilla", "kd", "ft", "pfeed", "sfeed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/feed_recon")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs of every recipe")
    ap.add_argument("--ae-epochs", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    overrides = [f"cache_dir={out / 'teachers'}", *args.overrides] + (
        [f"train.epochs={args.epochs}"] if args.epochs else []
    )
    rows = []
    t0 = time.perf_counter()
    for name in METHODS:
        recipe = load_recipe(recipe_dir("digits") / f"{name}.yaml", overrides)
        run_dir = out / name
        resume = (run_dir / "config.yaml").exists()
        result = pipeline.run(None if resume else recipe, run_dir, resume=resume, quiet=True)
        recon = analyze(run_dir, epochs=args.ae_epochs, log=lambda m: None)
        rows.append(
            {
                "method": name,
                "top1_last": result["top1_last"],
                "recon_error": recon["recon_error"],
                "layer": recon["layer"],
            }
        )
    print(f"{'method':<8} {'top-1':>7} {'recon error (L1, test)':>24}")
    for r in rows:
        print(f"{r['method']:<8} {r['top1_last']:>7.2f} {r['recon_error']:>24.5f}")
    report = {
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "overrides": overrides,
        "ae_epochs": args.ae_epochs,
    }
    atomic_write_text(out / "feed_recon.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'feed_recon.json'}")


if __name__ == "__main__":
    main()
