"""Figures from run directories: training curves (test top-1 and every loss term over epochs) and
FEED reconstruction-error bars. Written with matplotlib's Agg backend, so no display is needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kdlab.errors import KdlabError

DPI = 100
LINESTYLES = ("-", "--", ":", "-.")
TITLE_CHAR_INCHES = 0.085  # the width of one character of a 10-point title, with room to spare


def line_style(i: int) -> dict:
    """Colour and dash of the i-th line: matplotlib's 10 colours, then the same colours dashed, then dotted...,
    so that up to 40 runs (a demo has 16) stay distinguishable in one panel."""
    return {"color": f"C{i % 10}", "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]}


def panel_title(key: str) -> str:
    """What a metrics.jsonl key holds: each train_<term> is the term as it enters the loss, times its weight."""
    if key == "test_top1":
        return "test top-1 (%)"
    if key == "train_loss":
        return "train loss (sum of the weighted terms)"
    return f"train {key[len('train_') :]} (weighted)"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise KdlabError(f"{run_dir}: no metrics.jsonl (not a kdlab run directory?)")
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise KdlabError(f"{out}: the figure's format comes from its suffix; use .png, .svg or .pdf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=DPI)  # then renamed: a reader never sees half a figure
    tmp.replace(out)
    return out


def _series(runs: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std over the runs of one metric (epochs that every run with the key has)."""
    per_run = [{r["epoch"]: r[key] for r in rows if key in r and isinstance(r.get(key), (int, float))} for rows in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return [], [], []
    epochs = sorted(set.intersection(*(set(p) for p in per_run)))
    means, stds = [], []
    for e in epochs:
        vals = [p[e] for p in per_run]
        m = sum(vals) / len(vals)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return epochs, means, stds


def plot_groups(groups: list[tuple[str, list[Path]]], out: Path, title: str | None = None) -> Path:
    """One line per group: the mean over its runs, with a +-1 std band when it has several.

    Panels: test top-1, then every `train_*` loss term that any run logged.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    loaded = [(label, [read_metrics(d) for d in dirs]) for label, dirs in groups]
    terms = sorted(
        {
            k
            for _, runs in loaded
            for rows in runs
            for r in rows
            for k in r
            if k.startswith("train_") and k != "train_top1"
        }
    )
    panels = ["test_top1"] + sorted(terms, key=lambda k: (k != "train_loss", k))  # the total first, then each term
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.1 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for i, (label, runs) in enumerate(loaded):
            epochs, mean, std = _series(runs, key)
            if not epochs:
                continue
            style = line_style(i)
            ax.plot(epochs, mean, label=label, marker="." if len(epochs) < 30 else None, **style)
            if len(runs) > 1:
                ax.fill_between(
                    epochs,
                    [m - s for m, s in zip(mean, std)],
                    [m + s for m, s in zip(mean, std)],
                    color=style["color"],
                    alpha=0.15,
                )
        ax.set_title(panel_title(key))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    ncol = min(4, max(1, len(names)))
    legend_rows = math.ceil(len(names) / ncol)
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, width=max(20, int(4.6 * cols / TITLE_CHAR_INCHES))), fontsize=10)
    fig.tight_layout(rect=(0, min(0.45, 0.045 * legend_rows / rows_n + 0.02), 1, 1))
    path = _save(fig, out)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None, title: str | None = None) -> Path:
    """One line per run directory."""
    if labels is not None and len(labels) != len(run_dirs):
        raise KdlabError(f"{len(labels)} labels for {len(run_dirs)} runs")
    names = labels or [Path(d).name for d in run_dirs]
    return plot_groups([(name, [d]) for name, d in zip(names, run_dirs)], out, title)


def plot_recon(
    bars: list[tuple[str, list[float]]], out: Path, ylabel: str = "reconstruction error", title: str | None = None
) -> Path:
    """One bar per label: the mean of its values, each value a dot, a +-1 std error bar when several."""
    import textwrap

    plt = _pyplot()
    width = max(4.0, 0.9 * len(bars) + 2)
    fig, ax = plt.subplots(figsize=(width, 3.6))
    xs = list(range(len(bars)))
    for x, (_label, values) in zip(xs, bars):
        m = sum(values) / len(values)
        s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        ax.bar(x, m, color=f"C{x % 10}", alpha=0.8, yerr=s if len(values) > 1 else None, capsize=4)
        ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks(
        xs,
        [label for label, _ in bars],
        rotation=25 if len(bars) > 3 else 0,
        ha="right" if len(bars) > 3 else "center",
        fontsize=8,
    )
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if title:  # wrapped to the figure's width: a long settings line was cut at both edges
        ax.set_title(textwrap.fill(title, width=max(20, int(width / TITLE_CHAR_INCHES))), fontsize=10)
    fig.tight_layout()
    path = _save(fig, out)
    plt.close(fig)
    return path


def plot_recon_curves(
    lines: list[tuple[str, list[list[tuple[int, float]]]]],
    out: Path,
    ylabel: str = "reconstruction error",
    title: str | None = None,
) -> Path:
    """One line per label (the mean over its runs at each shared epoch), each run's points as dots."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, runs) in enumerate(lines):
        colour = f"C{i % 10}"
        style = ("-", "--", ":")[(i // 10) % 3]  # beyond ten recipes the line style tells apart what the colour cannot
        epochs = sorted(set.intersection(*[{e for e, _ in run} for run in runs]))
        means = [sum(dict(run)[e] for run in runs) / len(runs) for e in epochs]
        ax.plot(epochs, means, style, color=colour, marker="o", markersize=3, label=label)
        for run in runs:
            ax.scatter([e for e, _ in run], [v for _, v in run], color=colour, s=6, alpha=0.5)
    ax.set_xlabel("epochs trained (across generations)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    path = _save(fig, out)
    plt.close(fig)
    return path
