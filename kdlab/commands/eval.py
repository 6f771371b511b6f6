"""`kdlab eval RUN_DIR_OR_WEIGHTS`: top-1 / top-5 of a trained student on its data set's test split."""

from __future__ import annotations

from kdlab.commands import add_data_root, add_device
from kdlab.data_names import DATASETS

NAME = "eval"
HELP = "evaluate a run directory or a student.safetensors file"
ORDER = 1


def add_arguments(p) -> None:
    p.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument("--data", choices=DATASETS, help="default: the run's data set")
    add_data_root(p, "default: the run's data.root")
    add_device(p)
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")


def run(args) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    from kdlab import checkpoint, models
    from kdlab.compute import resolve_device
    from kdlab.config import DataConfig
    from kdlab.data.stream import StreamDataset
    from kdlab.errors import KdlabError
    from kdlab.recipe_files import read_yaml
    from kdlab.student import EVAL_BATCH, eval_loader, open_split, resolve_weights
    from kdlab.train import evaluate

    path, meta = resolve_weights(Path(args.weights))
    if "model" not in meta:
        raise KdlabError(f"{path}: no model name in its metadata; was it written by kdlab?")
    run_cfg = path.parent / "config.yaml"
    data = DataConfig.model_validate(read_yaml(run_cfg).get("data", {})) if run_cfg.exists() else DataConfig()
    name = args.data or data.name
    root = args.data_root or (data.root if name == data.name else None)
    test = open_split(data, "test", name=name, root=root)  # data.loader=stream: decoded batch by batch
    if test.skipped:
        sys.stderr.write(
            f"kdlab: {len(test.skipped)} unreadable file(s) left out of the test set; first: {test.skipped[0]}\n"
        )
    model = models.create(
        meta["model"],
        num_classes=meta.get("num_classes", test.num_classes),
        in_chans=meta.get("in_chans", 3),
        **meta.get("kwargs", {}),
    )
    checkpoint.load_state_into(model, checkpoint.load(path)[0], str(path))
    chans = test.image_shape[0]
    if test.num_classes != meta.get("num_classes", test.num_classes) or chans != meta.get("in_chans", 3):
        raise KdlabError(
            f"{path}: model has {meta.get('num_classes')} classes / {meta.get('in_chans')} channels, "
            f"data {name} has {test.num_classes} / {chans}"
        )
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    workers = data.stream_workers() if isinstance(test, StreamDataset) else 0
    loader = eval_loader(test, EVAL_BATCH, device, workers=workers, prefetch=data.prefetch)
    metrics = evaluate(model.to(device), loader)
    metrics.update(model=meta["model"], data=name, images=len(test.labels), seconds=round(time.perf_counter() - t0, 3))
    print(json.dumps(metrics))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
