"""FEED reconstruction-error analysis on a tiny digits run."""

import json
from pathlib import Path

import torch

from kdlab import checkpoint, runner
from kdlab.cli import main
from kdlab.config import load_recipe
from kdlab.data import DeviceLoader, load_dataset
from kdlab.losses.heads import Paraphraser
from kdlab.models import create

ROOT = Path(__file__).resolve().parents[1]


def test_recon_error_matches_a_recomputation_and_is_reused(tmp_path, capsys):
    run = tmp_path / "v"
    runner.run(load_recipe(ROOT / "recipes/digits/vanilla.yaml", ["train.epochs=1", "train.max_steps_per_epoch=3"]), run, quiet=True)
    assert main(["analyze", "recon", str(run), "--epochs", "1", "--loss", "l2"]) == 0
    result = json.loads((run / "recon.json").read_text())
    assert result["layer"] == "stage3" and result["loss"] == "l2" and result["recon_error"] > 0

    # recompute on the test set in float64 with the saved autoencoder, sample by sample
    net = create("smallcnn", num_classes=10, in_chans=1)
    net.load_state_dict(checkpoint.load(run / "student.safetensors")[0])
    net.eval().double()
    ae = Paraphraser(result["channels"], result["rate"])
    saved = checkpoint.load(next((run / "stages").glob("recon_*.safetensors")))[0]
    ae.load_state_dict({k[len("autoencoder."):]: v for k, v in saved.items()})
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
