"""One student trained in one run directory, and the setup sequence every training goes through.

`train_student` is the one place where a Distiller is built on a probe batch, given its training set,
its cached teacher logits and its pre-stages, and handed to `kdlab.train.fit`: `kdlab train` (through
`train_run`) and the Python API (`kdlab.api`) both call it. `train_run` adds what a run directory
holds: reuse of a finished run, resume, student.safetensors and result.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdlab import __version__, checkpoint, distributed, models, sync_bn
from kdlab.compute import autocast_factory, resolve_device
from kdlab.config import STREAM_TEACHER_CACHE, DataConfig, LossConfig, Recipe, TrainConfig, stream_conflict
from kdlab.data import ArrayDataset, DeviceLoader, default_augment, load_dataset
from kdlab.data.folder_index import folder_index
from kdlab.data.stream import StreamDataset, StreamLoader, choose_loader, open_stream
from kdlab.data.val_split import hold_out
from kdlab.distiller import Distiller
from kdlab.errors import CheckpointError, ConfigError
from kdlab.stages import StageContext, run_stages
from kdlab.train import evaluate, fit
from kdlab.train_state import TrainState

RESULT = "result.json"

EVAL_BATCH = 256


class Log:
    """Prints and appends to the run's log.txt."""

    def __init__(self, path: Path | None = None, quiet: bool = False, prefix: str = ""):
        self.path, self.quiet, self.prefix = path, quiet, prefix

    def __call__(self, msg: str) -> None:
        if not distributed.is_main():  # under torchrun rank 0 speaks for the job
            return
        line = f"{self.prefix}{msg}"
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def child(self, path: Path, prefix: str) -> Log:
        return Log(path, self.quiet, self.prefix + prefix)

    def notice(self, msg: str) -> None:
        """Printed even under --quiet: a run that waits for another process must not look hung."""
        Log(self.path, quiet=False, prefix=self.prefix)(msg)


@dataclass
class Data:
    train: object  # an ArrayDataset, or a StreamDataset (data.loader: stream)
    test: object
    num_classes: int
    in_chans: int
    val: object = None  # the validation split held out of train (data.val_split), or None
    workers: int = 0  # the stream loader's decoding processes and their prefetch depth
    prefetch: int = 2

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, StreamDataset)

    def train_loader(self, recipe: Recipe, batch_size: int, device, seed: int):
        """The training loader of `batch_size` (the global batch; under torchrun each rank takes its share)."""
        shard = (distributed.rank(), distributed.world_size())
        per_rank = distributed.per_rank_batch(batch_size)
        if self.streamed:
            flip = recipe.data.augment.flip
            return StreamLoader(
                self.train,
                per_rank,
                train=True,
                device=device,
                seed=seed,
                shard=shard,
                flip=True if flip is None else flip,
                workers=self.workers,
                prefetch=self.prefetch,
            )
        aug = default_augment(recipe.data.name, image_size=recipe.data.image_size)
        for key, value in recipe.data.augment.model_dump().items():
            if value is not None:
                setattr(aug, key, value)
        return DeviceLoader(self.train, per_rank, train=True, augment=aug, device=device, seed=seed, shard=shard)

    def loaders(self, recipe: Recipe, batch_size: int, device: torch.device, seed: int):
        distributed.check_device(device)
        return self.train_loader(recipe, batch_size, device, seed), self.test_loader(device, seed)

    def test_loader(self, device: torch.device, seed: int):
        return self._eval_loader(self.test, device, seed)

    def val_loader(self, device: torch.device, seed: int):
        """The validation split's loader, or None without data.val_split."""
        return None if self.val is None else self._eval_loader(self.val, device, seed)

    def _eval_loader(self, ds, device: torch.device, seed: int):
        distributed.check_device(device)
        shard = (distributed.rank(), distributed.world_size())
        return eval_loader(ds, EVAL_BATCH, device, seed, shard, self.workers, self.prefetch)


def eval_loader(ds, batch_size: int, device, seed: int = 0, shard=(0, 1), workers: int = 0, prefetch: int = 2):
    """The evaluation loader of an ArrayDataset (DeviceLoader) or a StreamDataset (StreamLoader)."""
    if isinstance(ds, StreamDataset):
        return StreamLoader(
            ds, batch_size, train=False, device=device, seed=seed, shard=shard, workers=workers, prefetch=prefetch
        )
    return DeviceLoader(ds, batch_size, train=False, device=device, seed=seed, shard=shard)


def open_split(data: DataConfig, split: str, name: str | None = None, root=None, mode: str | None = None):
    """One split of the recipe's data set (or of `name` at `root`): an ArrayDataset, or a StreamDataset when
    data.loader resolves to stream (`mode`: the resolved loader, when the caller has it)."""
    name = name or data.name
    root = root if root is not None else data.root
    if name != "imagefolder":
        return load_dataset(name, root, split=split)
    kw = {"image_size": data.image_size, "skip_unreadable": data.skip_unreadable}
    if mode is None:
        mode = choose_loader(data.loader, name, root, **kw)
    if mode == "stream":
        return open_stream(root, split, **kw)
    return load_dataset(name, root, split=split, **kw)


def _index_and_choose(cfg: DataConfig, kw: dict) -> str:
    mode = choose_loader(cfg.loader, cfg.name, cfg.root, **kw)
    if mode == "stream":
        for split in ("train", "test"):
            folder_index(cfg.root, split, cfg.skip_unreadable)
    return mode


def load_data(recipe: Recipe) -> Data:
    cfg = recipe.data
    kw = {"image_size": cfg.image_size, "skip_unreadable": cfg.skip_unreadable}
    # under torchrun rank 0 lists the folder and writes its index, which the other ranks then read back, and its
    # choice for data.loader=auto holds for every rank
    mode = distributed.main_first(lambda: _index_and_choose(cfg, kw))
    if mode == "stream":  # data.loader=auto chose it: the refusals the recipe check makes for an explicit stream
        problem = stream_conflict(cfg.augment)
        if problem:
            raise ConfigError(f"data.{problem} (data.loader=auto streams this folder)")
        if recipe.train.teacher_cache:
            raise ConfigError(f"{STREAM_TEACHER_CACHE} (data.loader=auto streams this folder)")
    train = open_split(cfg, "train", mode=mode)
    test = open_split(cfg, "test", mode=mode)
    val = None
    if cfg.val_split:  # drawn from the recipe's seed: the same split for its teachers and its student
        train, val = hold_out(train, cfg.val_split, recipe.seed)
    workers = cfg.stream_workers() if mode == "stream" else 0
    return Data(train, test, train.num_classes, train.image_shape[0], val, workers, cfg.prefetch)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, kwargs: dict, data: Data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, num_classes=data.num_classes, in_chans=data.in_chans, **kwargs)


def read_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RESULT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:  # damaged JSON, or bytes that are not UTF-8: not a finished run
        return None


def train_student(
    distiller: Distiller,
    train_loader,
    test_loader,
    cfg: TrainConfig,
    run_dir: Path,
    log: Callable[[str], None],
    device: torch.device,
    train_set: ArrayDataset | StreamDataset | None = None,
    resume: bool = False,
    keeps_checkpoints: bool = True,
    logits_cache: Path | None = None,
    on_probe: Callable[[torch.Tensor], None] | None = None,
    val_loader=None,
) -> TrainState:
    """The setup sequence, written once for `kdlab train` and `kdlab.api`: the distiller on its device, its
    side modules sized on a probe batch, the training set's labels attached (CRD's memory bank), the
    teachers' logits cached (`logits_cache`), the terms' pre-stages, then `kdlab.train.fit`.

    `train_set`: the training set behind `train_loader` (None for a user's DataLoader: a term that reads
    sample indices is then refused, and no teacher logits are cached). `on_probe`: called with the probe
    batch once the side modules are built. `val_loader`: the validation split, evaluated with the test set."""
    distiller.to(device)
    if not distiller.built:
        probe_x, probe_y = next(iter(test_loader if test_loader is not None else train_loader))
        distiller.build(probe_x[:8], probe_y[:8])
        if on_probe is not None:
            on_probe(probe_x)
    if not distiller.attached:
        if train_set is not None:
            distiller.attach_training_set(train_set.labels.to(device))
        elif distiller.needs_indices:
            raise ConfigError(
                "fit: a loss term that reads each sample's index (crd) needs kdlab's array data "
                "(images and labels), not a DataLoader, so that the index names one sample"
            )
    if cfg.sync_bn:  # the side modules built just now (FitNet's regressor has a BatchNorm)
        sync_bn.convert_sync_batchnorm(distiller.terms, device)
    autocast = autocast_factory(cfg, device)
    teacher_cache = None
    if (
        distiller.teachers
        and train_set is not None
        and logits_cache is not None
        and (cfg.teacher_cache or cfg.fast.fold_teacher)
    ):
        from kdlab.fast.teachers import prepare_teachers

        teacher_cache = prepare_teachers(distiller, train_set, train_loader, cfg, logits_cache, autocast, log)
    ctx = StageContext(
        student=distiller.student,
        teachers=distiller.teachers,
        train_loader=train_loader,
        device=device,
        run_dir=run_dir,
        autocast=autocast,
        log=log,
        forward=distiller.outputs,
        max_steps=cfg.max_steps_per_epoch,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    run_stages(ctx, distiller.terms.values())
    return fit(
        distiller,
        train_loader,
        test_loader,
        cfg,
        run_dir,
        log,
        resume=resume,
        teacher_cache=teacher_cache,
        keeps_checkpoints=keeps_checkpoints,
        val_loader=val_loader,
    )


def train_run(
    run_dir: Path,
    recipe: Recipe,
    student_name: str,
    student_kwargs: dict,
    teachers: list[nn.Module],
    loss: LossConfig,
    train_cfg: TrainConfig,
    seed: int,
    data: Data,
    log: Log,
    extra: dict | None = None,
    init: Callable[[nn.Module], None] | None = None,
    logits_cache: Path | None = None,
) -> dict:
    """Train (or resume, or reuse) one student in `run_dir`; returns its result.json content.

    `init`: replaces the fresh initialisation (a generation that starts from the previous one's weights).
    `logits_cache`: where the teachers' logits are cached under train.teacher_cache / train.fast.fold_teacher.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, run_dir / "checkpoints"):
        checkpoint.remove_stale_temps(folder)  # left by a writer that was killed mid-write
    done = read_result(run_dir)
    if done is not None:
        log(f"{run_dir}: finished earlier (top-1 {done['top1_last']:.2f}), reused")
        return done
    t_start = time.time()
    device = resolve_device(train_cfg.device)
    student = build_model(student_name, student_kwargs, data, seed)
    if init is not None:
        init(student)
    if train_cfg.sync_bn:  # before the Distiller: its taps hook the converted modules
        student = sync_bn.convert_sync_batchnorm(student, device)
    train_loader, test_loader = data.loaders(recipe, train_cfg.batch_size, device, seed)
    distiller = Distiller(student, teachers, loss)
    state = train_student(
        distiller,
        train_loader,
        test_loader,
        train_cfg,
        run_dir,
        log,
        device,
        train_set=data.train,
        resume=(run_dir / "checkpoints").exists(),
        logits_cache=logits_cache,
        val_loader=data.val_loader(device, seed),
    )
    last = state.history[-1] if state.history else {}
    if "test_top1" not in last:
        ev = evaluate(student, test_loader, autocast_factory(train_cfg, device))
        last = {**last, "test_top1": ev["top1"], "test_top5": ev["top5"]}
    best_top1 = max(state.best_top1, last["test_top1"])
    result = {
        "top1_last": last["test_top1"],
        "top1_best": best_top1,
        "best_epoch": state.best_epoch,
        **selection(state.history, best_top1, state.best_epoch),
        "top5_last": last["test_top5"],
        "epochs": train_cfg.epochs,
        "seed": seed,
        **({"val_images": len(data.val)} if data.val is not None else {}),
        "params": param_count(student),
        "student": student_name,
        "method": recipe.method,
        "data": recipe.data.name,
        "device": device_name(device),
        "wall_seconds": round(time.time() - t_start, 2),
        "kdlab": __version__,
        "torch": torch.__version__,
        **({"world_size": distributed.world_size()} if distributed.world_size() > 1 else {}),
        **(extra or {}),
    }
    if distributed.is_main():
        # the preprocessing travels with the weights, so an export (ONNX metadata) needs no data set at hand
        checkpoint.save(
            run_dir / "student.safetensors",
            student.state_dict(),
            {
                "model": student_name,
                "kwargs": student_kwargs,
                "num_classes": data.num_classes,
                "in_chans": data.in_chans,
                **preprocessing(data.train),
            },
        )
        checkpoint.atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    distributed.barrier()  # every rank may read these files next (a teacher, a generation)
    log(f"{run_dir}: top-1 last {result['top1_last']:.2f} best {result['top1_best']:.2f} ({result['params']:,} params)")
    return result


def selection(history: list[dict], top1_best: float, best_epoch: int) -> dict:
    """The selected epoch of a run: the one with the best validation top-1 (ties: the later epoch, as the best
    test epoch's rule) and the test top-1 there; without a validation split the best test epoch, labelled so."""
    rows = [r for r in history if "val_top1" in r and "test_top1" in r]
    if not rows:
        return {"top1_selected": top1_best, "selected_epoch": best_epoch, "selected_on": "test"}
    chosen = max(reversed(rows), key=lambda r: r["val_top1"])  # reversed: max keeps the first of equals
    return {
        "top1_selected": chosen["test_top1"],
        "selected_epoch": chosen["epoch"],
        "selected_on": "val",
        "val_top1_selected": chosen["val_top1"],
    }


def preprocessing(ds) -> dict:
    """What a deployed model needs to turn pixels into its input: x = (pixels / 255 - mean) / std, per channel."""
    return {"mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std], "class_names": list(ds.class_names)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def resolve_weights(path: Path) -> tuple[Path, dict]:
    """A run directory or a student.safetensors file -> (weights path, its metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (expected a run directory or a .safetensors file)")
    _, meta = checkpoint.load(path)
    return path, meta
