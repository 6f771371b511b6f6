"""FEED reconstruction-error analysis on a tiny digits run."""

import json
from pathlib import Path

import torch

from kdlab import checkpoint, pipeline
from kdlab.cli import main
from kdlab.data import DeviceLoader, load_dataset
from kdlab.losses.heads import Paraphraser
from kdlab.models import create
from kdlab.recipe_files import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recon_error_matches_a_recomputation_and_is_reused(tmp_path, capsys):
    run = tmp_path / "v"
    pipeline.run(
        load_recipe(ROOT / "recipes/digits/vanilla.yaml", ["train.epochs=1", "train.max_steps_per_epoch=3"]),
        run,
        quiet=True,
    )
    assert main(["analyze", "recon", str(run), "--epochs", "1", "--loss", "l2"]) == 0
    result = json.loads((run / "recon.json").read_text())
    assert result["layer"] == "stage3" and result["loss"] == "l2" and result["recon_error"] > 0

    # recompute on the test set in float64 with the saved autoencoder, sample by sample
    net = create("smallcnn_narrow", num_classes=10, in_chans=1)
    net.load_state_dict(checkpoint.load(run / "student.safetensors")[0])
    net.eval().double()
    ae = Paraphraser(result["channels"], result["rate"])
    saved = checkpoint.load(next((run / "stages").glob("recon_*.safetensors")))[0]
    ae.load_state_dict({k[len("autoencoder.") :]: v for k, v in saved.items()})
    ae.double().eval()
    feats = {}
    net.stage3.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
    total, count = 0.0, 0
    with torch.no_grad():
        for x, _ in DeviceLoader(load_dataset("digits", split="test"), 100, train=False):
            net(x.double())
            f = feats["f"]
            for n in range(f.shape[0]):
                total += float(((ae(f[n : n + 1]) - f[n : n + 1]) ** 2).mean())
                count += 1
    assert abs(total / count - result["recon_error"]) < 1e-4

    before = result["recon_error"]
    assert main(["analyze", "recon", str(run), "--epochs", "1", "--loss", "l2"]) == 0
    assert "loaded" in capsys.readouterr().out  # the fitted autoencoder is reused, not refitted
    assert json.loads((run / "recon.json").read_text())["recon_error"] == before


def test_recon_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["analyze", "recon", str(tmp_path / "nothing")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_recon_curve_has_a_point_per_kept_epoch_and_generation(tmp_path, capsys):
    import shutil

    run = tmp_path / "s"
    sets = [
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
        "train.keep_epochs=[1]",
        "generations=2",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    pipeline.run(load_recipe(ROOT / "recipes/digits/sfeed.yaml", sets), run, quiet=True)
    assert main(["analyze", "recon", str(run), "--epochs", "1", "--curve"]) == 0
    result = json.loads((run / "recon.json").read_text())
    where = [(p["generation"], p["epoch"]) for p in result["curve"]]
    assert where == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    errors = [p["recon_error"] for p in result["curve"]]
    assert errors[-1] == result["recon_error"] and len(set(errors)) == len(errors)

    # a point is the plain analysis of the weights it names: generation 1 after its first epoch
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("config.yaml", "result.json"):
        shutil.copy(run / name, alone / name)
    shutil.copy(run / "generations" / "gen1" / "checkpoints" / "epoch_1.safetensors", alone / "student.safetensors")
    assert main(["analyze", "recon", str(alone), "--epochs", "1"]) == 0
    assert json.loads((alone / "recon.json").read_text())["recon_error"] == errors[2]

    png = tmp_path / "curve.png"
    assert main(["plot", str(run), "--recon", "--recon-curve", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["plot", str(alone), "--recon", "--recon-curve", "--out", str(png)]) == 2
    assert "analyze recon --curve" in capsys.readouterr().err
