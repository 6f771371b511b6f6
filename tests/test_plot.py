"""kdlab plot on tiny digits runs made here: curves per run and per recipe, reconstruction-error bars, and
figures that stay legible (20 distinguishable lines, the weighted CE said so, titles inside the figure).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import digits_runs, md_rows

from kdlab.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{vanilla,kd}-s{0,1}: two recipes, two seeds each; kd trains its teacher into runs/kd-s*/teachers."""
    return digits_runs(tmp_path_factory.mktemp("runs"))


def test_plot_writes_a_small_png_per_run_and_per_recipe(runs, tmp_path, capsys):
    for extra, name in (([], "curves.png"), (["--mean"], "mean.png")):
        out = tmp_path / name
        assert main(["plot", str(runs), "--out", str(out), *extra]) == 0
        data = out.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 200_000
    assert main(["plot", str(runs / "kd-s0"), "--out", str(tmp_path / "x.png"), "--labels", "a", "b"]) == 2
    assert "--labels" in capsys.readouterr().err


def test_plot_recon_needs_recon_json_then_draws_bars(runs, tmp_path, capsys):
    out = tmp_path / "recon.png"
    assert main(["plot", "--recon", str(runs / "kd-s0"), str(runs / "vanilla-s0"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no recon.json" in err and "kdlab analyze recon" in err and len(err.splitlines()) == 1
    assert not out.exists()
    written = []
    try:
        for name, value in (("kd-s0", 0.25), ("kd-s1", 0.35), ("vanilla-s0", 0.5)):
            path = runs / name / "recon.json"
            path.write_text(
                json.dumps({"recon_error": value, "loss": "l1", "layer": "stage3", "rate": 0.5, "epochs": 10})
            )
            written.append(path)
        assert (
            main(
                [
                    "plot",
                    "--recon",
                    str(runs / "kd-s0"),
                    str(runs / "kd-s1"),
                    str(runs / "vanilla-s0"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert out.read_bytes().startswith(PNG_MAGIC)
        # the table shows the recon column too: the mean over the recipe's seeds
        assert main(["table", str(runs / "kd-s0"), str(runs / "kd-s1")]) == 0
        assert md_rows(capsys.readouterr().out)[0][-1] == "0.3000 ± 0.0707"
        written[-1].write_text(
            json.dumps({"recon_error": 0.5, "loss": "l2", "layer": "stage3", "rate": 0.5, "epochs": 10})
        )
        assert main(["plot", "--recon", str(runs / "kd-s0"), str(runs / "vanilla-s0"), "--out", str(out)]) == 2
        assert "different settings" in capsys.readouterr().err
    finally:
        for path in written:
            path.unlink()


# ----------------------------------------------------------------------------------------------
# Legible pictures: 20 distinguishable lines, unclipped titles, the weighted CE said so


def _captured_figures(monkeypatch) -> list:
    from kdlab.tools import plots

    figures = []
    real = plots._save

    def keep(fig, out):
        figures.append(fig)
        return real(fig, out)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_curves_of_twenty_runs_are_distinguishable_and_labelled(tmp_path, monkeypatch):
    from kdlab.tools import plots

    runs = []
    for i in range(20):
        d = tmp_path / f"r{i}"
        d.mkdir()
        rows = [
            {"epoch": e, "train_loss": 1.0 / e + i, "train_ce": 0.5 / e, "test_top1": 10.0 * e + i} for e in (1, 2, 3)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(d)
    figures = _captured_figures(monkeypatch)
    plots.plot_runs(runs, tmp_path / "curves.png")
    ax = figures[0].axes[0]
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
    assert len(ax.get_lines()) == 20 and len(styles) == 20
    titles = [a.get_title() for a in figures[0].axes if a.get_title()]
    assert "train ce (weighted)" in titles and any(t.startswith("train loss") for t in titles)


def test_recon_plot_title_is_inside_the_figure(tmp_path, monkeypatch):
    from kdlab.tools import plots

    figures = _captured_figures(monkeypatch)
    title = "test reconstruction error (l1, layer stage3:pre, k=0.5, 10 epochs) of every recipe in this table"
    plots.plot_recon([("kd", [0.1, 0.2]), ("ft", [0.3])], tmp_path / "recon.png", title=title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures[0]
    canvas = FigureCanvasAgg(fig)  # the figure was closed after saving; draw it again at its saved size
    canvas.draw()
    box = fig.axes[0].title.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
