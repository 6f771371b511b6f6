"""FEED's reconstruction-error analysis: how well an autoencoder of the FT paraphraser's shape
reconstructs a frozen network's feature map. Fitted on the training set, measured on the test set.

Open choices of the paper, kept as options: the loss (L1 as the FT code, or L2), the bottleneck
rate k, the number of epochs, and the tapped layer (default: the last stage, post-ReLU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlab import checkpoint
from kdlab.config import read_yaml, validate
from kdlab.losses import functional as F
from kdlab.losses.heads import Paraphraser
from kdlab.runner import build_model, load_data, load_model_weights, resolve_device
from kdlab.stages import StageContext, run_stage
from kdlab.taps import FeatureTaps, default_layers
from kdlab.train import autocast_factory

RESULT = "recon.json"


def analyze(run_dir: Path, layer: str | None = None, rate: float = 0.5, epochs: int = 10, lr: float = 0.1,
            loss: str = "l1", log=print) -> dict:
    """Fit the autoencoder on the frozen student of `run_dir`; write and return recon.json's content."""
    run_dir = Path(run_dir)
    recipe = validate(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    data = load_data(recipe)
    device = resolve_device(recipe.train.device)
    net = build_model(recipe.student.name, recipe.student.kwargs, data, recipe.seed)
    load_model_weights(net, run_dir, "network")
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
    ctx = StageContext(student=net, teachers=[], train_loader=train_loader, device=device, run_dir=run_dir,
                       autocast=autocast_factory(recipe.train, device), log=log, forward=None,
                       momentum=recipe.train.momentum, weight_decay=recipe.train.weight_decay)
    tag = f"recon_{spec.replace(':', '_').replace('.', '_')}_{loss}_k{rate}_e{epochs}"
    run_stage(ctx, tag, {"autoencoder": ae}, ae.parameters(), lambda x, y: F.recon_error(ae(features(x)), features(x), kind=loss),
              epochs, lr)
    ae.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, _ in test_loader:
            f = features(x)
            total += float(F.recon_error(ae(f), f, kind=loss)) * f.shape[0]
            count += f.shape[0]
    result = {"recon_error": total / max(count, 1), "loss": loss, "layer": spec, "channels": channels, "rate": rate,
              "epochs": epochs, "lr": lr, "network": recipe.student.name, "method": recipe.method}
    checkpoint.atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    log(f"{run_dir}: reconstruction error ({loss}, {spec}) {result['recon_error']:.5f}")
    return result
