"""FEED's reconstruction-error analysis: how well an autoencoder of the FT paraphraser's shape
reconstructs a frozen network's feature map. Fitted on the training set, measured on the test set.

Open choices of the paper, kept as options: the loss (L1 as the FT code, or L2), the bottleneck
rate k, the number of epochs, and the tapped layer (default: the last stage, post-ReLU).

FEED (Park & Kwak, 2019) reads the error as curves along training, whose trends differ between KD
and pFEED. `curve=True` measures every weight snapshot a run kept (`train.keep_epochs`) and, for a
sequential run, every generation, each with a fresh autoencoder of the same seed, so that the points
are comparable with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlab import checkpoint
from kdlab.compute import autocast_factory, resolve_device
from kdlab.losses import functional as F
from kdlab.losses.base import PreStage
from kdlab.losses.heads import Paraphraser
from kdlab.recipe_files import read_yaml, validate
from kdlab.stages import StageContext, run_stage
from kdlab.student import build_model, load_data
from kdlab.taps import FeatureTaps, default_layers
from kdlab.teachers import load_model_weights

RESULT = "recon.json"


def analyze(
    run_dir: Path,
    layer: str | None = None,
    rate: float = 0.5,
    epochs: int = 10,
    lr: float = 0.1,
    loss: str = "l1",
    log=print,
    curve: bool = False,
) -> dict:
    """Fit the autoencoder on the frozen student of `run_dir`; write and return recon.json's content.

    `curve`: also one point per kept epoch (and per generation of a sequential run), in `result["curve"]`."""
    run_dir = Path(run_dir)
    recipe = validate(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    data = load_data(recipe)
    device = resolve_device(recipe.train.device)
    settings = dict(layer=layer, rate=rate, epochs=epochs, lr=lr, loss=loss)
    final = _measure(recipe, data, device, run_dir / "student.safetensors", run_dir, "", log, **settings)
    result = {
        "recon_error": final["error"],
        "loss": loss,
        "layer": final["layer"],
        "channels": final["channels"],
        "rate": rate,
        "epochs": epochs,
        "lr": lr,
        "network": recipe.student.name,
        "method": recipe.method,
    }
    if curve:
        points = []
        for generation, folder in _generation_dirs(recipe, run_dir):
            for epoch, weights in _snapshots(folder, recipe.train.epochs):
                is_final = weights == run_dir / "student.safetensors"
                m = (
                    final
                    if is_final
                    else _measure(recipe, data, device, weights, run_dir, f"g{generation}_e{epoch}_", log, **settings)
                )
                points.append({"generation": generation, "epoch": epoch, "recon_error": m["error"]})
        result["curve"] = points
        result["epochs_per_generation"] = recipe.train.epochs
    checkpoint.atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    log(
        f"{run_dir}: reconstruction error ({loss}, {result['layer']}) {result['recon_error']:.5f}"
        + (f"; {len(result['curve'])} point(s) along training" if curve else "")
    )
    return result


def _generation_dirs(recipe, run_dir: Path) -> list[tuple[int, Path]]:
    """(generation, run folder) of every network the run trained, in training order; one entry for a plain run."""
    if not recipe.generations:
        return [(0, run_dir)]
    from kdlab.teachers import generation_zero, teacher_run_dir

    gen0 = teacher_run_dir(recipe, 0, generation_zero(recipe), run_dir)
    later = [run_dir / "generations" / f"gen{g}" for g in range(1, recipe.generations)] + [run_dir]
    return [(0, gen0)] + list(enumerate(later, 1))


def _snapshots(folder: Path, epochs: int) -> list[tuple[int, Path]]:
    """(epoch, weights) of every kept epoch of one run, then its final weights."""
    kept = {}
    for path in (folder / "checkpoints").glob("epoch_*.safetensors"):
        kept[int(path.stem.split("_")[1])] = path
    kept.setdefault(epochs, folder / "student.safetensors")
    return sorted(kept.items())


def _measure(
    recipe, data, device, weights: Path, run_dir: Path, tag_prefix: str, log, layer, rate, epochs, lr, loss
) -> dict:
    """Test-set reconstruction error of one frozen network's map by an autoencoder fitted on the train set
    (fitted once: saved under `run_dir/stages/` and loaded by a rerun)."""
    net = build_model(recipe.student.name, recipe.student.kwargs, data, recipe.seed)
    load_model_weights(net, weights, "network")
    net.to(device).eval().requires_grad_(False)
    spec = layer or default_layers(net, "last", "network")[0]
    taps = FeatureTaps(net, [spec], "network")
    train_loader, test_loader = data.loaders(recipe, recipe.train.batch_size, device, recipe.seed)

    @torch.no_grad()
    def features(x):
        net(x)
        return taps.take()[spec].float()

    channels = features(next(iter(test_loader))[0][:2]).shape[1]
    torch.manual_seed(recipe.seed)
    ae = Paraphraser(channels, rate).to(device)
    ctx = StageContext(
        student=net,
        teachers=[],
        train_loader=train_loader,
        device=device,
        run_dir=run_dir,
        autocast=autocast_factory(recipe.train, device),
        log=log,
        forward=None,
        momentum=recipe.train.momentum,
        weight_decay=recipe.train.weight_decay,
    )
    tag = f"recon_{tag_prefix}{spec.replace(':', '_').replace('.', '_')}_{loss}_k{rate}_e{epochs}"
    fit_autoencoder = PreStage(
        tag,
        {"autoencoder": ae},
        ae.parameters,
        lambda x, y: F.recon_error(ae(features(x)), features(x), kind=loss),
        epochs,
        lr,
        "--lr",
    )
    run_stage(ctx, fit_autoencoder)
    ae.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, _ in test_loader:
            f = features(x)
            total += float(F.recon_error(ae(f), f, kind=loss)) * f.shape[0]
            count += f.shape[0]
    return {"error": total / max(count, 1), "layer": spec, "channels": channels}
