"""`kdlab plot RUN_DIR... --out FILE.png`: training curves, or (--recon) FEED reconstruction-error bars."""

from __future__ import annotations

NAME = "plot"
HELP = "plot test top-1 and every loss term over epochs (one line per run), or --recon: reconstruction-error bars"


def add_arguments(p) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or folders searched for them (a run holds result.json)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="figure to write (.png, .svg or .pdf)")
    p.add_argument(
        "--mean", action="store_true", help="one line per recipe: the mean over its seeds with a ±1 std band"
    )
    p.add_argument(
        "--recon",
        action="store_true",
        help="bar chart of each recipe's reconstruction error, read from the runs' recon.json (kdlab analyze recon)",
    )
    p.add_argument(
        "--recon-curve",
        action="store_true",
        help="with --recon: the reconstruction error along training (and across generations), one line per "
        "recipe, from recon.json curves (kdlab analyze recon --curve)",
    )
    p.add_argument(
        "--labels", nargs="+", metavar="LABEL", help="one label per line (default: the runs' paths, shortened)"
    )
    p.add_argument("--title", help="figure title")
    p.add_argument(
        "--all",
        dest="include_sub_runs",
        action="store_true",
        help="also take the teacher caches (teachers/) and earlier generations (generations/) found below",
    )


def short_names(paths: list) -> list[str]:
    """Paths without their common leading folders: runs/a/kd, runs/a/at -> kd, at."""
    from pathlib import Path

    parts = [Path(p).resolve().parts for p in paths]
    if len(parts) == 1:
        return [parts[0][-1]]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def run(args) -> int:
    from kdlab.errors import KdlabError
    from kdlab.tools import plots, results

    runs, unfinished = results.find_runs(args.runs, include_sub_runs=args.include_sub_runs)
    if unfinished:
        results.warn(
            f"skipped {len(unfinished)} unfinished run(s) (no result.json): {', '.join(map(str, unfinished[:5]))}"
        )
    if args.recon:
        missing = [str(r.path) for r in runs if not (r.recon and "recon_error" in r.recon)]
        if missing:
            raise KdlabError(
                f"no recon.json in {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                f"compute it first with: kdlab analyze recon {' '.join(missing[:5])}"
            )
        settings = {
            (r.recon.get("loss"), r.recon.get("layer"), r.recon.get("rate"), r.recon.get("epochs")) for r in runs
        }
        if len(settings) > 1:
            raise KdlabError(
                "the runs' recon.json were measured with different settings (loss, layer, rate, epochs): "
                f"{sorted(settings, key=str)}; rerun kdlab analyze recon with one setting for all"
            )
        loss, layer, rate, epochs = settings.pop()
        groups = results.group_runs(runs)
        labels = _labels(args.labels, [g.label for g in groups])
        title = args.title or f"test reconstruction error ({loss}, layer {layer}, k={rate}, {epochs} epochs)"
        ylabel = f"mean {loss} error" if loss else "reconstruction error"
        if args.recon_curve:
            flat = [str(r.path) for r in runs if "curve" not in r.recon]
            if flat:
                raise KdlabError(
                    f"no curve in the recon.json of {', '.join(flat[:5])}; measure it with: "
                    f"kdlab analyze recon --curve {' '.join(flat[:5])}"
                )
            lines = [(label, [recon_points(r.recon) for r in g.runs]) for label, g in zip(labels, groups)]
            path = plots.plot_recon_curves(lines, args.out, ylabel=ylabel, title=title)
        else:
            bars = [(label, [r.recon["recon_error"] for r in g.runs]) for label, g in zip(labels, groups)]
            path = plots.plot_recon(bars, args.out, ylabel=ylabel, title=title)
    elif args.recon_curve:
        raise KdlabError("--recon-curve goes with --recon")
    elif args.mean:
        groups = results.group_runs(runs)
        labels = _labels(args.labels, [f"{g.label} (n={len(g.runs)})" for g in groups])
        path = plots.plot_groups(
            [(label, [r.path for r in g.runs]) for label, g in zip(labels, groups)], args.out, args.title
        )
    else:
        paths = [r.path for r in runs]
        path = plots.plot_runs(paths, args.out, labels=_labels(args.labels, short_names(paths)), title=args.title)
    print(f"wrote {path}")
    return 0


def recon_points(recon: dict) -> list[tuple[int, float]]:
    """(epochs trained in all, error) per point: generation g's epoch e is at g * epochs_per_generation + e."""
    per = recon.get("epochs_per_generation", 0)
    return [(p["generation"] * per + p["epoch"], p["recon_error"]) for p in recon["curve"]]


def _labels(given, default: list[str]) -> list[str]:
    from kdlab.errors import KdlabError

    if given is None:
        return default
    if len(given) != len(default):
        raise KdlabError(f"--labels: {len(given)} label(s) for {len(default)} line(s)/bar(s)")
    return list(given)
