"""Teachers: given by weights, or trained here and cached under a content hash of what determines them.

`teacher_key` names a trained teacher's cache folder; its value for a given recipe must not change (a
cached teacher is found again by it). A sequential recipe's generation 0 is trained and cached like a
teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml
from torch import nn

from kdlab import checkpoint, distributed
from kdlab.compute import autocast_factory, resolve_device
from kdlab.config import LossConfig, Recipe, TeacherConfig, TrainConfig, teacher_train_config
from kdlab.errors import CheckpointError
from kdlab.lock import RunLock
from kdlab.models import reference_keys
from kdlab.student import RESULT, Data, Log, build_model, param_count, read_result, train_run
from kdlab.train import evaluate
from kdlab.train_state import CKPT_BEST


def teacher_key(recipe: Recipe, teacher: TeacherConfig, train_cfg: TrainConfig, seed: int) -> str:
    """Content hash of everything that determines a trained teacher's weights.

    Options at their default value are left out, so a new option whose default keeps today's
    training does not change the key of every teacher already trained and cached."""
    # speed options that cannot change a teacher's own training (it has no teachers) stay out of the key
    train = train_cfg.model_dump(
        mode="json",
        exclude_defaults=True,
        exclude={"teacher_cache": True, "fast": {"fold_teacher", "cache_dtype", "cache_storage"}},
    )
    if not train_cfg.fast.graph_step:
        train.pop("fast", None)
    data = recipe.data.model_dump(
        mode="json", exclude_defaults=True, exclude={"root", "workers", "prefetch"}
    )  # where the files sit is not what they are, and the number of decoding processes changes no batch
    payload = {"model": teacher.name, "kwargs": teacher.kwargs, "data": data, "train": train, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_root(recipe: Recipe, out: Path) -> Path:
    if recipe.cache_dir:
        return Path(recipe.cache_dir)
    if os.environ.get("KDLAB_CACHE"):
        return Path(os.environ["KDLAB_CACHE"])
    return out / "teachers"


def load_model_weights(model: nn.Module, path: Path, what: str) -> None:
    """Weights from a run directory, a .safetensors file or a reference implementation's torch checkpoint
    (read with weights_only=True, its key names mapped to the zoo's: kdlab.models.reference_keys)."""
    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    source = f"{what} {path}"
    checkpoint.load_state_into(model, reference_keys.adapt(model, checkpoint.load_weights(path), source), source)


def teacher_seed(recipe: Recipe, index: int, teacher: TeacherConfig) -> int:
    return teacher.seed if teacher.seed is not None else recipe.seed + 1 + index


def teacher_run_dir(recipe: Recipe, index: int, teacher: TeacherConfig, out: Path) -> Path:
    """Where a teacher that is trained here (not given by weights) is trained and cached."""
    seed = teacher_seed(recipe, index, teacher)
    cfg = teacher_train_config(recipe, teacher)
    return cache_root(recipe, out) / f"{teacher.name}-{teacher_key(recipe, teacher, cfg, seed)}"


def trained_teachers(recipe: Recipe) -> list[tuple[int, TeacherConfig]]:
    """The (index, config) of every teacher this recipe trains before its student: given weights are not
    trained, and a sequential recipe's generation 0 is trained like a teacher."""
    if recipe.generations:
        return [(0, generation_zero(recipe))]
    return [(i, t) for i, t in enumerate(recipe.teachers) if not t.weights]


def generation_zero(recipe: Recipe) -> TeacherConfig:
    # a vanilla student with the run's protocol and seed: cached like a teacher, so every sequential
    # recipe of the same student and protocol shares it
    return TeacherConfig(
        name=recipe.student.name,
        kwargs=recipe.student.kwargs,
        seed=recipe.seed,
        checkpoint=recipe.generation_checkpoint,
    )


def train_teacher(
    recipe: Recipe, index: int, teacher: TeacherConfig, data: Data, out: Path, log: Log
) -> tuple[Path, dict]:
    """Train (or resume, or reuse) one teacher in its cache folder; another process training the same
    teacher is waited for, not failed."""
    seed = teacher_seed(recipe, index, teacher)
    cfg = teacher_train_config(recipe, teacher)
    run_dir = teacher_run_dir(recipe, index, teacher, out)
    with distributed.on_main(lambda: RunLock(run_dir, wait=True, say=log.notice)):
        if distributed.is_main() and read_result(run_dir) is None:
            checkpoint.atomic_write_text(
                run_dir / "config.yaml",
                yaml.safe_dump(
                    {"teacher_of": str(out), "model": teacher.name, "seed": seed, "train": cfg.model_dump(mode="json")},
                    sort_keys=False,
                ),
            )
        result = train_run(
            run_dir,
            recipe.model_copy(update={"method": "vanilla"}),
            teacher.name,
            teacher.kwargs,
            [],
            LossConfig(ce=1.0),
            cfg,
            seed,
            data,
            log.child(run_dir / "log.txt", f"[teacher {index}] "),
        )
    return run_dir, result


def best_weights(run_dir: Path, result: dict, what: str) -> Path:
    """The selected epoch's weights of a finished run (train.keep_best: the best validation epoch under
    data.val_split, else the best test epoch), checked against its result.json."""
    path = Path(run_dir) / "checkpoints" / CKPT_BEST
    if not path.exists():
        raise CheckpointError(
            f"{what}: {run_dir} holds no best-epoch weights ({path.name}); it was trained without "
            "train.keep_best: move the folder away to retrain it"
        )
    _, meta = checkpoint.load(path)
    selected = result.get("selected_epoch", result.get("best_epoch"))
    if meta.get("epoch") != selected:
        raise CheckpointError(
            f"{what}: {path} holds epoch {meta.get('epoch')} but {run_dir / RESULT} says the selected epoch "
            f"is {selected}; move the folder away to retrain it"
        )
    return path


def teacher_top1(model: nn.Module, data: Data, train_cfg: TrainConfig, seed: int) -> float:
    device = resolve_device(train_cfg.device)
    return evaluate(model.to(device), data.test_loader(device, seed), autocast_factory(train_cfg, device))["top1"]


def prepare_teacher(
    recipe: Recipe, index: int, teacher: TeacherConfig, data: Data, out: Path, log: Log
) -> tuple[nn.Module, dict]:
    """The teacher's model with the weights that teach, and what result.json records of it; `top1` is the
    test top-1 of exactly those weights."""
    seed = teacher_seed(recipe, index, teacher)
    model = build_model(teacher.name, teacher.kwargs, data, seed)
    info = {"name": teacher.name, "params": param_count(model)}
    if teacher.weights:
        load_model_weights(model, Path(teacher.weights), f"teacher {index}")
        info["source"] = teacher.weights
        # evaluated once before the student trains, so a wrong, mismatched or random teacher shows at once
        info["top1"] = teacher_top1(model, data, recipe.train, seed)
        log(f"teacher {index} ({teacher.name}, {teacher.weights}): test top-1 {info['top1']:.2f}")
        return model, info
    run_dir, result = train_teacher(recipe, index, teacher, data, out, log)
    info.update(
        source=str(run_dir), top1_last=result["top1_last"], top1_best=result["top1_best"], checkpoint=teacher.checkpoint
    )
    if teacher.epoch is not None:
        path = run_dir / "checkpoints" / f"epoch_{teacher.epoch}.safetensors"
        load_model_weights(model, path, f"teacher {index} (epoch {teacher.epoch})")
        info["epoch"] = teacher.epoch
        info["top1_at_epoch"] = info["top1"] = teacher_top1(model, data, teacher_train_config(recipe, teacher), seed)
    elif teacher.checkpoint == "best":
        load_model_weights(model, best_weights(run_dir, result, f"teacher {index}"), f"teacher {index} (best epoch)")
        info.update(
            best_epoch=result.get("selected_epoch", result["best_epoch"]),
            top1=result.get("top1_selected", result["top1_best"]),
            selected_on=result.get("selected_on", "test"),
        )
    else:
        load_model_weights(model, run_dir / "student.safetensors", f"teacher {index}")
        info["top1"] = result["top1_last"]
    return model, info


def describe_teachers(recipe: Recipe, out: Path, log: Log) -> None:
    """One line per teacher trained here: its resolved protocol. `--set train.*` reaches the teachers too
    (their `train` section only overrides the recipe's), which this makes visible before hours are spent."""
    for i, t in trained_teachers(recipe):
        cfg = teacher_train_config(recipe, t)
        sched = cfg.schedule
        steps = f", {cfg.max_steps_per_epoch} steps/epoch" if cfg.max_steps_per_epoch else ""
        who = "generation 0" if recipe.generations else f"teacher {i}"
        overrides = f" (own overrides: {', '.join(sorted(t.train))})" if t.train else ""
        log(
            f"{who}: {t.name}, trained here: {cfg.epochs} epochs{steps}, batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"{sched.type} schedule, seed {teacher_seed(recipe, i, t)}{overrides}; "
            f"cached in {teacher_run_dir(recipe, i, t, out)}"
        )
