"""`kdlab export RUN_DIR --out FILE`: the plain student alone, as safetensors (with the metadata
`kdlab eval` reads) or ONNX. Side modules (regressors, translators, paraphrasers) never leave.

The student comes from the run's `student.safetensors`, or with `--checkpoint` from a training
checkpoint of a run that has not finished, where only the `student.` part of the state is kept.

Both formats carry the preprocessing the model expects: per-channel `mean` and `std` (input =
(pixels / 255 - mean) / std), the input size and the class names. ONNX keeps them as the model's
metadata_props (JSON values), read with `onnx.load(f).metadata_props` or onnxruntime's
`InferenceSession(f).get_modelmeta().custom_metadata_map`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

NAME = "export"
HELP = "export a run's student alone (side modules dropped) as safetensors or ONNX"
FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
IMAGE_SIZES = {"digits": 8, "cifar10": 32, "cifar100": 32}


def add_arguments(p) -> None:
    from kdlab.commands import int_range

    p.add_argument("source", metavar="RUN_DIR", help="a run directory, or a student .safetensors file written by kdlab")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (.safetensors or .onnx)")
    p.add_argument("--format", dest="fmt", choices=["safetensors", "onnx"], help="default: from the suffix of --out")
    p.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="take the student from checkpoints/NAME.safetensors (last, prev, epoch_N) instead of student.safetensors",
    )
    p.add_argument(
        "--image-size",
        type=int_range(1, 65_536),
        metavar="PIXELS",
        help="ONNX input height = width (default: from the run's data set)",
    )


# ----------------------------------------------------------------------------------------------
# The student and what describes it


def _run_config(run_dir: Path) -> dict:
    from kdlab.recipe_files import read_yaml

    path = run_dir / "config.yaml"
    return read_yaml(path) if path.exists() else {}


def _model_of_config(cfg: dict, where: Path) -> tuple[str, dict]:
    from kdlab.errors import KdlabError

    if isinstance(cfg.get("student"), dict) and cfg["student"].get("name"):  # a recipe run
        return cfg["student"]["name"], cfg["student"].get("kwargs") or {}
    if cfg.get("model"):  # a cached teacher run
        return cfg["model"], {}
    raise KdlabError(f"{where}: config.yaml names no student model")


def infer_io(name: str, kwargs: dict, state: dict) -> tuple[int, int]:
    """(num_classes, in_chans) read off the weights: the classifier's rows and the first conv's input channels."""
    from torch import nn

    from kdlab import models
    from kdlab.errors import CheckpointError

    template = models.create(name, **kwargs)
    classifier = f"{template.classifier_module}.weight"
    first_conv = next((f"{n}.weight" for n, m in template.named_modules() if isinstance(m, nn.Conv2d)), None)
    if classifier not in state or first_conv is None or first_conv not in state:
        raise CheckpointError(f"weights do not look like a {name}: no {classifier} / {first_conv}")
    return int(state[classifier].shape[0]), int(state[first_conv].shape[1])


def load_student(source: Path, checkpoint_name: str | None = None):
    """(the plain student module, its metadata) from a run directory or a kdlab student file."""
    from kdlab import checkpoint, models
    from kdlab.errors import CheckpointError, KdlabError
    from kdlab.student import resolve_weights

    source = Path(source)
    if checkpoint_name is not None:
        if not source.is_dir():
            raise KdlabError(f"--checkpoint needs a run directory, got {source}")
        path = source / "checkpoints" / f"{checkpoint_name.removesuffix('.safetensors')}.safetensors"
        tensors, _ = checkpoint.load(path)
        if any(k.startswith("model.") for k in tensors):  # a training checkpoint: the Distiller's state and more
            state = {k[len("model.student.") :]: v for k, v in tensors.items() if k.startswith("model.student.")}
            if not state:
                raise CheckpointError(f"{path}: no student weights in this checkpoint")
        else:  # kept epoch weights (train.keep_epochs): the student's state already
            state = tensors
        name, kwargs = _model_of_config(_run_config(source), source)
        num_classes, in_chans = infer_io(name, kwargs, state)
        meta = {"model": name, "kwargs": kwargs, "num_classes": num_classes, "in_chans": in_chans}
        dropped = len(tensors) - len(state)
    else:
        path, meta = resolve_weights(source)
        if "model" not in meta:
            raise CheckpointError(f"{path}: no model name in its metadata; was it written by kdlab?")
        state = checkpoint.load(path)[0]
        dropped = 0
    model = models.create(
        meta["model"],
        num_classes=meta.get("num_classes", 100),
        in_chans=meta.get("in_chans", 3),
        **meta.get("kwargs", {}),
    )
    checkpoint.load_state_into(model, state, str(path))  # strict: a key too many or missing fails here
    cfg = _run_config(path.parent if checkpoint_name is None else source)
    data = cfg.get("data") or {}
    meta = {**meta, "source": str(path), "dropped_tensors": dropped}
    if data.get("name"):
        meta["data"] = data["name"]
        size = data.get("image_size") if data["name"] == "imagefolder" else IMAGE_SIZES.get(data["name"])
        if size:
            meta["image_size"] = size
    if "mean" not in meta:  # a run from before kdlab kept them with the weights, or a training checkpoint
        meta.update(_preprocessing_of_data(data))
    return model.eval(), meta


def _preprocessing_of_data(data: dict) -> dict:
    """mean, std and class names read off the run's training set; {} with a note when it is not at hand."""
    from kdlab.config import DataConfig
    from kdlab.errors import KdlabError
    from kdlab.student import open_split, preprocessing

    if not data.get("name"):
        return {}
    try:
        cfg = DataConfig.model_validate(data)
        return preprocessing(open_split(cfg, "train"))  # a streamed folder: its index, nothing decoded
    except (KdlabError, ValueError) as e:
        return {"preprocessing_missing": f"the training set to read mean/std from is not at hand ({e})"}


PREPROCESSING_KEYS = ("mean", "std", "class_names")


# ----------------------------------------------------------------------------------------------
# Writers


def export_safetensors(model, meta: dict, out: Path) -> None:
    from kdlab import checkpoint

    keep = ("model", "kwargs", "num_classes", "in_chans", "data", "image_size", *PREPROCESSING_KEYS)
    checkpoint.save(
        out, model.state_dict(), {k: meta[k] for k in keep if k in meta} | {"exported_from": meta["source"]}
    )


def export_onnx(model, meta: dict, out: Path, image_size: int | None) -> float | None:
    """Write the ONNX graph (batch axis dynamic); with onnxruntime installed, the largest output
    difference to PyTorch on a random batch (an error above the tolerance), else None."""
    import warnings

    import torch

    from kdlab.errors import KdlabError

    if importlib.util.find_spec("onnx") is None:
        raise KdlabError("ONNX export needs the 'onnx' package (pip install onnx; add onnxruntime to check the file)")
    size = image_size or meta.get("image_size")
    if not size:
        raise KdlabError("ONNX export needs the input size: pass --image-size (the run's data set does not say it)")
    x = torch.randn(2, meta.get("in_chans", 3), size, size, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: it needs only 'onnx'
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
            )
        add_onnx_metadata(tmp, meta, size)
    except Exception as e:  # a broken onnx install or an op the exporter cannot express: one line, not a traceback
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise KdlabError(f"ONNX export of {meta['model']} failed ({type(e).__name__}: {first})") from None
    tmp.replace(out)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    batch = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])
    with torch.no_grad():
        want = model(batch)
    diff = float((got - want).abs().max())
    if not diff <= ONNX_TOLERANCE:
        raise KdlabError(
            f"{out}: ONNX outputs differ from PyTorch by {diff:.3g} (> {ONNX_TOLERANCE}); "
            "the file is kept for inspection"
        )
    return diff


def onnx_metadata(meta: dict, size: int) -> dict[str, str]:
    """The metadata_props of an exported model: strings, JSON for lists."""
    props = {
        "model": meta["model"],
        "num_classes": meta.get("num_classes"),
        "in_chans": meta.get("in_chans", 3),
        "input_size": [meta.get("in_chans", 3), size, size],
        "input_layout": "NCHW, float32",
        "normalization": "(pixels / 255 - mean) / std, per channel",
    }
    props.update({k: meta[k] for k in PREPROCESSING_KEYS if k in meta})
    if "data" in meta:
        props["data"] = meta["data"]
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items() if v is not None}


def add_onnx_metadata(path: Path, meta: dict, size: int) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in onnx_metadata(meta, size).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"kdlab student {meta['model']}; input: (pixels / 255 - mean) / std, see metadata_props"
    onnx.save(model, str(path))


def run(args) -> int:
    from kdlab.errors import KdlabError

    out = Path(args.out)
    fmt = args.fmt or FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise KdlabError(f"--out {out}: give --format, or a file ending in {' or '.join(FORMATS)}")
    if args.image_size is not None and args.image_size < 1:
        raise KdlabError("--image-size must be a positive number of pixels")
    model, meta = load_student(Path(args.source), args.checkpoint)
    if out.resolve() == Path(meta["source"]).resolve():
        raise KdlabError(f"--out {out} is the file being exported; choose another path")
    params = sum(p.numel() for p in model.parameters())
    if fmt == "safetensors":
        export_safetensors(model, meta, out)
        check = ""
    else:
        diff = export_onnx(model, meta, out, args.image_size)
        check = (
            "; onnxruntime not installed, outputs not checked"
            if diff is None
            else f"; onnxruntime max |diff| {diff:.2e}"
        )
    dropped = f", {meta['dropped_tensors']} side-module/optimizer tensors dropped" if meta["dropped_tensors"] else ""
    if "preprocessing_missing" in meta:
        check += f"; no mean/std in the file: {meta['preprocessing_missing']}"
    print(json.dumps({"out": str(out), "format": fmt, "model": meta["model"], "params": params}))
    print(f"exported {meta['model']} ({params:,} parameters{dropped}) to {out}{check}")
    return 0
