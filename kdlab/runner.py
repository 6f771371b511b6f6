"""A recipe becomes a run directory: teachers (given, cached or trained), generations, stages, the student.

Every sub-run (a teacher, a generation) is itself a run directory with its own checkpoints and
`result.json`; a finished one is reused and an unfinished one resumed, so rerunning a killed
recipe continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn

from kdlab import __version__, checkpoint, distributed, models
from kdlab.config import LossConfig, Recipe, TeacherConfig, TrainConfig, dump, teacher_train_config, validate
from kdlab.data import DeviceLoader, default_augment, load_dataset
from kdlab.distiller import Distiller
from kdlab.errors import CheckpointError, ConfigError, KdlabError
from kdlab.lock import LOCK_NAME, RunLock
from kdlab.methods import check_recipe
from kdlab.models import reference_keys
from kdlab.stages import StageContext
from kdlab.train import CKPT_BEST, autocast_factory, check_device_options, evaluate, fit, resolve_device

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

    def child(self, path: Path, prefix: str) -> "Log":
        return Log(path, self.quiet, self.prefix + prefix)

    def notice(self, msg: str) -> None:
        """Printed even under --quiet: a run that waits for another process must not look hung."""
        Log(self.path, quiet=False, prefix=self.prefix)(msg)


@dataclass
class Data:
    train: object
    test: object
    num_classes: int
    in_chans: int

    def loaders(self, recipe: Recipe, batch_size: int, device: torch.device, seed: int):
        aug = default_augment(recipe.data.name, image_size=recipe.data.image_size)
        for key, value in recipe.data.augment.model_dump().items():
            if value is not None:
                setattr(aug, key, value)
        # batch_size is the global batch; under torchrun each rank takes its share of every step's batch
        distributed.check_device(device)
        shard = (distributed.rank(), distributed.world_size())
        train = DeviceLoader(self.train, distributed.per_rank_batch(batch_size), train=True, augment=aug, device=device,
                             seed=seed, shard=shard)
        return train, self.test_loader(device, seed)

    def test_loader(self, device: torch.device, seed: int):
        distributed.check_device(device)
        shard = (distributed.rank(), distributed.world_size())
        return DeviceLoader(self.test, EVAL_BATCH, train=False, device=device, seed=seed, shard=shard)


def check_protocol(recipe: Recipe, data: Data, cfg: TrainConfig, seed: int, what: str) -> None:
    """What fit would refuse at its first step (the device, a batch larger than the data, the seed), checked on a
    CPU loader that shares the data's memory: the student's protocol must not fail after its teachers trained."""
    try:
        device = resolve_device(cfg.device)
        distributed.check_device(device)
        per_rank = distributed.per_rank_batch(cfg.batch_size)
        DeviceLoader(data.train, per_rank, train=True, device="cpu", seed=seed,
                     shard=(distributed.rank(), distributed.world_size()))
    except KdlabError as e:
        raise type(e)(f"{what}: {e}") from None


@torch.no_grad()
def preflight(recipe: Recipe, data: Data) -> None:
    """Untrained copies of the student and teachers, wired and probed with one batch, and every protocol and
    given weights file checked, so a wrong layer name, tapped shapes that do not fit, a missing teacher file or
    an impossible batch fail now rather than after hours of teacher training."""
    check_protocol(recipe, data, recipe.train, recipe.seed, "train")
    for i, t in trained_teachers(recipe):
        check_protocol(recipe, data, teacher_train_config(recipe, t), teacher_seed(recipe, i, t),
                       f"teachers.{i}.train" if not recipe.generations else "generation 0")
    student = build_model(recipe.student.name, recipe.student.kwargs, data, recipe.seed)
    specs = recipe.teachers or ([recipe.student] if recipe.generations else [])
    teachers = [build_model(t.name, t.kwargs, data, recipe.seed) for t in specs]
    for i, (t, model) in enumerate(zip(recipe.teachers, teachers)):
        if t.weights:  # read in full once here: absent, corrupt, unsafe or of another shape
            load_model_weights(model, Path(t.weights), f"teacher {i}")
    distiller = Distiller(student, teachers, recipe.loss)
    probe = data.test if len(data.test.labels) >= len(data.train.labels) else data.train
    n = min(recipe.train.batch_size, len(probe.labels))  # terms such as lp need a batch the size of training's
    x, y = probe.images[:n].float().div(255), probe.labels[:n]
    distiller.build(x[:8], y[:8])
    distiller.attach_training_set(data.train.labels)
    distiller.train()(x, y, progress=0.0, indices=torch.arange(n))  # the terms' own shape checks run in their forward


def load_data(recipe: Recipe) -> Data:
    kw = {"image_size": recipe.data.image_size, "skip_unreadable": recipe.data.skip_unreadable} \
        if recipe.data.name == "imagefolder" else {}
    train = load_dataset(recipe.data.name, recipe.data.root, split="train", **kw)
    test = load_dataset(recipe.data.name, recipe.data.root, split="test", **kw)
    return Data(train, test, train.num_classes, train.images.shape[1])


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
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------------------------
# One training run in one directory


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
    init_from: Path | None = None,
) -> dict:
    """Train (or resume, or reuse) one student in `run_dir`; returns its result.json content.

    `init_from`: a run directory whose student weights replace the fresh initialisation.
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
    if init_from is not None:
        load_model_weights(student, init_from, "initial weights")
    if train_cfg.sync_bn:  # before the Distiller: its taps hook the converted modules
        student = distributed.convert_sync_batchnorm(student, device)
    train_loader, test_loader = data.loaders(recipe, train_cfg.batch_size, device, seed)
    distiller = Distiller(student, teachers, loss).to(device)
    probe_x, probe_y = next(iter(test_loader))
    distiller.build(probe_x[: min(8, len(probe_x))], probe_y[: min(8, len(probe_y))])
    distiller.attach_training_set(data.train.labels.to(device))
    if train_cfg.sync_bn:  # the side modules built just now (FitNet's regressor has a BatchNorm)
        distributed.convert_sync_batchnorm(distiller.terms, device)
    autocast = autocast_factory(train_cfg, device)
    teacher_cache = None
    if teachers and (train_cfg.teacher_cache or train_cfg.fast.fold_teacher):
        from kdlab.fast.teachers import prepare_teachers

        teacher_cache = prepare_teachers(distiller, data.train, train_loader, train_cfg, cache_root(recipe, run_dir) / "logits",
                                         autocast, log)
    ctx = StageContext(
        student=student, teachers=distiller.teachers, train_loader=train_loader, device=device, run_dir=run_dir,
        autocast=autocast, log=log, forward=distiller.outputs, max_steps=train_cfg.max_steps_per_epoch,
        momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay,
    )
    for term in distiller.terms.values():
        term.pre_stage(ctx)
    resume = (run_dir / "checkpoints").exists()
    state = fit(distiller, train_loader, test_loader, train_cfg, run_dir, log, resume=resume, teacher_cache=teacher_cache)
    last = state.history[-1] if state.history else {}
    if "test_top1" not in last:
        ev = evaluate(student, test_loader, autocast)
        last = {**last, "test_top1": ev["top1"], "test_top5": ev["top5"]}
    result = {
        "top1_last": last["test_top1"],
        "top1_best": max(state.best_top1, last["test_top1"]),
        "best_epoch": state.best_epoch,
        "top5_last": last["test_top5"],
        "epochs": train_cfg.epochs,
        "seed": seed,
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
        checkpoint.save(run_dir / "student.safetensors", student.state_dict(), {
            "model": student_name, "kwargs": student_kwargs, "num_classes": data.num_classes, "in_chans": data.in_chans,
            **preprocessing(data.train)})
        checkpoint.atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    distributed.barrier()  # every rank may read these files next (a teacher, a generation)
    log(f"{run_dir}: top-1 last {result['top1_last']:.2f} best {result['top1_best']:.2f} ({result['params']:,} params)")
    return result


def preprocessing(ds) -> dict:
    """What a deployed model needs to turn pixels into its input: x = (pixels / 255 - mean) / std, per channel."""
    return {"mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std], "class_names": list(ds.class_names)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------
# Teachers


def teacher_key(recipe: Recipe, teacher: TeacherConfig, train_cfg: TrainConfig, seed: int) -> str:
    """Content hash of everything that determines a trained teacher's weights.

    Options at their default value are left out, so a new option whose default keeps today's
    training does not change the key of every teacher already trained and cached."""
    # speed options that cannot change a teacher's own training (it has no teachers) stay out of the key
    train = train_cfg.model_dump(mode="json", exclude_defaults=True,
                                 exclude={"teacher_cache": True, "fast": {"fold_teacher", "cache_dtype", "cache_storage"}})
    if not train_cfg.fast.graph_step:
        train.pop("fast", None)
    data = recipe.data.model_dump(mode="json", exclude_defaults=True, exclude={"root"})  # where the files sit is not what they are
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
    return TeacherConfig(name=recipe.student.name, kwargs=recipe.student.kwargs, seed=recipe.seed,
                         checkpoint=recipe.generation_checkpoint)


def train_teacher(recipe: Recipe, index: int, teacher: TeacherConfig, data: Data, out: Path, log: Log) -> tuple[Path, dict]:
    """Train (or resume, or reuse) one teacher in its cache folder; another process training the same
    teacher is waited for, not failed."""
    seed = teacher_seed(recipe, index, teacher)
    cfg = teacher_train_config(recipe, teacher)
    run_dir = teacher_run_dir(recipe, index, teacher, out)
    with distributed.on_main(lambda: RunLock(run_dir, wait=True, say=log.notice)):
        if distributed.is_main() and read_result(run_dir) is None:
            checkpoint.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
                {"teacher_of": str(out), "model": teacher.name, "seed": seed, "train": cfg.model_dump(mode="json")}, sort_keys=False))
        result = train_run(run_dir, recipe.model_copy(update={"method": "vanilla"}), teacher.name, teacher.kwargs, [],
                           LossConfig(ce=1.0), cfg, seed, data, log.child(run_dir / "log.txt", f"[teacher {index}] "))
    return run_dir, result


def best_weights(run_dir: Path, result: dict, what: str) -> Path:
    """The best-test-epoch weights of a finished run (train.keep_best), checked against its result.json."""
    path = Path(run_dir) / "checkpoints" / CKPT_BEST
    if not path.exists():
        raise CheckpointError(f"{what}: {run_dir} holds no best-epoch weights ({path.name}); it was trained without "
                              "train.keep_best: move the folder away to retrain it")
    _, meta = checkpoint.load(path)
    if meta.get("epoch") != result.get("best_epoch"):
        raise CheckpointError(f"{what}: {path} holds epoch {meta.get('epoch')} but {run_dir / RESULT} says the best epoch "
                              f"is {result.get('best_epoch')}; move the folder away to retrain it")
    return path


def teacher_top1(model: nn.Module, data: Data, train_cfg: TrainConfig, seed: int) -> float:
    device = resolve_device(train_cfg.device)
    return evaluate(model.to(device), data.test_loader(device, seed), autocast_factory(train_cfg, device))["top1"]


def prepare_teacher(recipe: Recipe, index: int, teacher: TeacherConfig, data: Data, out: Path, log: Log) -> tuple[nn.Module, dict]:
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
    info.update(source=str(run_dir), top1_last=result["top1_last"], top1_best=result["top1_best"], checkpoint=teacher.checkpoint)
    if teacher.epoch is not None:
        path = run_dir / "checkpoints" / f"epoch_{teacher.epoch}.safetensors"
        load_model_weights(model, path, f"teacher {index} (epoch {teacher.epoch})")
        info["epoch"] = teacher.epoch
        info["top1_at_epoch"] = info["top1"] = teacher_top1(model, data, teacher_train_config(recipe, teacher), seed)
    elif teacher.checkpoint == "best":
        load_model_weights(model, best_weights(run_dir, result, f"teacher {index}"), f"teacher {index} (best epoch)")
        info.update(best_epoch=result["best_epoch"], top1=result["top1_best"])
    else:
        load_model_weights(model, run_dir / "student.safetensors", f"teacher {index}")
        info["top1"] = result["top1_last"]
    return model, info


# ----------------------------------------------------------------------------------------------
# A whole recipe


# What a run directory may hold besides its config.yaml before its first epoch is checkpointed; all of it is
# rewritten by a fresh start (teachers/ is content-addressed, so a changed recipe never reads a stale teacher)
UNSTARTED_ENTRIES = {"log.txt", "metrics.jsonl", "tb", "checkpoints", "stages", "teachers", "generations", LOCK_NAME}
# what a fresh start removes when the recipe changed: results of the old recipe that a new run would read back
STALE_WITH_OLD_RECIPE = ("stages", "tb", "generations")


def has_progress(run_dir: Path) -> bool:
    """A finished run, or one with a checkpoint (its own or a generation's): resumed, never restarted."""
    run_dir = Path(run_dir)
    if (run_dir / RESULT).exists() or (run_dir / "student.safetensors").exists():
        return True
    dirs = [run_dir] + sorted((run_dir / "generations").glob("gen*"))
    return any((d / "checkpoints" / name).exists() or (d / RESULT).exists() for d in dirs
               for name in ("last.safetensors", "prev.safetensors"))


def _foreign(out: Path) -> list[str]:
    """Entries of `out` that a kdlab run without a checkpoint does not have."""
    names = sorted(p.name for p in out.iterdir())
    return [n for n in names if n != "config.yaml" and n not in UNSTARTED_ENTRIES and not checkpoint.TEMP_NAME.match(n)]


def start(recipe: Recipe | None, out: Path, resume: bool, log: Callable[[str], None] = print) -> Recipe:
    """Check the output directory and write (or read back) its config.yaml.

    A new run goes into a new or empty folder, or into a run folder whose run never finished an epoch (an
    earlier attempt stopped by a wrong teacher file, a bad data file or a NaN at its first steps): that
    attempt left nothing to resume, so it must not block the corrected rerun. Anything else is refused:
    a finished run, a run with checkpoints, and a folder that is not a kdlab run at all."""
    from kdlab.config import read_yaml

    out = Path(out)
    config_path = out / "config.yaml"
    if resume:
        if not config_path.exists():
            raise ConfigError(f"--resume {out}: no config.yaml there (not a kdlab run directory)")
        return validate(read_yaml(config_path), source=str(config_path))
    if (out / RESULT).exists():
        raise ConfigError(f"{out} holds a finished run; choose another --out (nothing was overwritten)")
    assert recipe is not None
    check_recipe(recipe)
    if out.is_dir() and not config_path.exists():
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"{out} is not empty ({shown}) and is not a kdlab run; choose a new or empty folder "
                              "for --out (nothing was changed)")
    if config_path.exists():
        try:
            old = validate(read_yaml(config_path), source=str(config_path))
        except KdlabError:
            raise ConfigError(f"{out} holds a config.yaml that is not a kdlab recipe; choose a new or empty folder "
                              "for --out (nothing was changed)") from None
        foreign = _foreign(out)
        if has_progress(out) or foreign:
            what = f" and {', '.join(foreign[:3])}" if foreign else ""
            raise ConfigError(f"{out} already holds a run{what}; continue it with 'kdlab train --resume {out}' "
                              "or choose another --out")
        if dump(old) != dump(recipe):
            for name in STALE_WITH_OLD_RECIPE:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
        log(f"{out}: the run there never finished an epoch; starting it afresh")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(config_path, dump(recipe))
    return recipe


def resumable(run_dir: Path) -> bool:
    """Whether `kdlab demo` / `kdlab reproduce` continue the run in `run_dir` rather than (re)start it."""
    return (Path(run_dir) / "config.yaml").exists() and has_progress(run_dir)


def run(recipe: Recipe | None, out: Path, resume: bool = False, quiet: bool = False) -> dict:
    out = Path(out)
    given = recipe
    # under torchrun rank 0 alone locks the directory and writes config.yaml; every rank gets the recipe from it
    with distributed.session(_configured_device(given, out), out), distributed.on_main(lambda: RunLock(out)):
        recipe = distributed.main_first(lambda: start(given, out, resume, log=Log(out / "log.txt", quiet)))
        check_recipe(recipe)
        check_run_options(recipe, distributed.world_size(), torch.cuda.is_available())
        log = Log(out / "log.txt", quiet)
        if read_result(out) is not None:
            log(f"{out}: already finished")
            return read_result(out)
        data = load_data(recipe)
        for split, ds in (("train", data.train), ("test", data.test)):
            if ds.skipped:
                log(f"data: {len(ds.skipped)} unreadable file(s) left out of {split} (data.skip_unreadable); "
                    f"first: {ds.skipped[0]}")
        preflight(recipe, data)
        describe_teachers(recipe, out, log)
        if recipe.generations:
            return run_generations(recipe, out, data, log)
        teachers, infos = [], []
        for i, t in enumerate(recipe.teachers):
            model, info = prepare_teacher(recipe, i, t, data, out, log)
            teachers.append(model)
            infos.append(info)
        return train_run(out, recipe, recipe.student.name, recipe.student.kwargs, teachers, recipe.loss, recipe.train,
                         recipe.seed, data, log, extra={"teachers": infos})


def check_run_options(recipe: Recipe, world: int, cuda: bool) -> None:
    """The device-dependent refusals of every train section the recipe will run (its teachers' first),
    so that a combination that cannot work fails before hours of teacher training."""
    # a sequential recipe's generation 0 trains with recipe.train itself
    sections = [] if recipe.generations else [(f"teachers.{i}.train", teacher_train_config(recipe, t))
                                              for i, t in trained_teachers(recipe)]
    for where, cfg in [*sections, ("train", recipe.train)]:
        device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
        check_device_options(cfg, device_type, world, where)


def describe_teachers(recipe: Recipe, out: Path, log: Log) -> None:
    """One line per teacher trained here: its resolved protocol. `--set train.*` reaches the teachers too
    (their `train` section only overrides the recipe's), which this makes visible before hours are spent."""
    for i, t in trained_teachers(recipe):
        cfg = teacher_train_config(recipe, t)
        sched = cfg.schedule
        steps = f", {cfg.max_steps_per_epoch} steps/epoch" if cfg.max_steps_per_epoch else ""
        who = "generation 0" if recipe.generations else f"teacher {i}"
        overrides = f" (own overrides: {', '.join(sorted(t.train))})" if t.train else ""
        log(f"{who}: {t.name}, trained here: {cfg.epochs} epochs{steps}, batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"{sched.type} schedule, seed {teacher_seed(recipe, i, t)}{overrides}; "
            f"cached in {teacher_run_dir(recipe, i, t, out)}")


def run_generations(recipe: Recipe, out: Path, data: Data, log: Log) -> dict:
    """Generation 0 trained on labels; generation g learns from generation g-1; the last one is `out` itself."""
    gens = recipe.generations
    best = recipe.generation_checkpoint == "best"
    _, info = prepare_teacher(recipe, 0, generation_zero(recipe), data, out, log)
    gen_dirs = [Path(info["source"])] + [out / "generations" / f"gen{g}" for g in range(1, gens)] + [out]
    results = [read_result(gen_dirs[0])]
    for g in range(1, gens + 1):
        teacher = build_model(recipe.student.name, recipe.student.kwargs, data, recipe.seed)
        source = best_weights(gen_dirs[g - 1], results[-1], f"generation {g - 1}") if best else gen_dirs[g - 1]
        load_model_weights(teacher, source, f"generation {g - 1}")
        history = [{"generation": i, "top1_last": r["top1_last"], "top1_best": r["top1_best"]} for i, r in enumerate(results)]
        extra = {"generation": g, "generations": history, "teachers": [{
            "name": recipe.student.name, "source": str(gen_dirs[g - 1]), "top1_last": results[-1]["top1_last"],
            "checkpoint": recipe.generation_checkpoint, "top1": results[-1]["top1_best" if best else "top1_last"]}]}
        glog = log if g == gens else log.child(gen_dirs[g] / "log.txt", f"[gen {g}] ")
        # a generation that teaches the next one keeps its best weights when those are the ones that teach
        train_cfg = recipe.train.model_copy(update={"keep_best": True}) if best and g < gens else recipe.train
        results.append(train_run(gen_dirs[g], recipe, recipe.student.name, recipe.student.kwargs, [teacher], recipe.loss,
                                 train_cfg, recipe.seed + g, data, glog, extra=extra,
                                 init_from=source if recipe.generation_init == "previous" else None))
    final = dict(results[-1])
    final["generations"] = [{"generation": i, "top1_last": r["top1_last"], "top1_best": r["top1_best"]} for i, r in enumerate(results)]
    if recipe.bane and gens >= 1:
        final["bane_top1"] = ensemble_top1(recipe, data, gen_dirs[1:])
        log(f"BANE (generations 1..{gens}) top-1 {final['bane_top1']:.2f}")
    if distributed.is_main():
        checkpoint.atomic_write_text(out / RESULT, json.dumps(final, indent=2) + "\n")
    distributed.barrier()
    return final


@torch.no_grad()
def ensemble_top1(recipe: Recipe, data: Data, run_dirs: list[Path]) -> float:
    """Top-1 of the average softmax of several students (BAN's ensemble of generations)."""
    device = resolve_device(recipe.train.device)
    _, test_loader = data.loaders(recipe, recipe.train.batch_size, device, recipe.seed)
    nets = []
    for d in run_dirs:
        net = build_model(recipe.student.name, recipe.student.kwargs, data, 0)
        load_model_weights(net, d, "generation")
        nets.append(net.to(device).eval())
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for x, y in test_loader:
        probs = torch.stack([net(x).float().softmax(1) for net in nets]).mean(0)
        counts += torch.stack([(probs.argmax(1) == y).sum(), y.new_full((), y.numel())]).double()  # no host-to-device copy
    if test_loader.shard[1] > 1:
        distributed.all_reduce_sum(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


def _configured_device(recipe: Recipe | None, out: Path) -> str:
    """train.device of the recipe, or of the run being resumed (read before any rank may write there)."""
    if recipe is not None:
        return recipe.train.device
    try:
        from kdlab.config import read_yaml

        return str((read_yaml(out / "config.yaml").get("train") or {}).get("device", "auto"))
    except (KdlabError, AttributeError):
        return "auto"  # start() reports what is wrong with the directory


def resolve_weights(path: Path) -> tuple[Path, dict]:
    """A run directory or a student.safetensors file -> (weights path, its metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (expected a run directory or a .safetensors file)")
    _, meta = checkpoint.load(path)
    return path, meta


__all__ = ["run", "train_run", "Log", "load_data", "resolve_weights", "KdlabError"]
