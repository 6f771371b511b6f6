"""A recipe becomes a run directory: teachers (given, cached or trained), generations, stages, the student.

The pipeline on top of the core: `run` checks the output folder (`start`), loads the data, probes the
whole recipe on one batch (`preflight`), gets the teachers (`kdlab.teachers`) and trains the student
(`kdlab.student.train_run`), or a sequence of generations (`run_generations`, BAN's ensemble).
Every sub-run (a teacher, a generation) is itself a run directory with its own checkpoints and
`result.json`; a finished one is reused and an unfinished one resumed, so rerunning a killed
recipe continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from kdlab import checkpoint, distributed
from kdlab.compute import check_device_options, resolve_device
from kdlab.config import Recipe, TrainConfig, teacher_train_config
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError, KdlabError
from kdlab.lock import LOCK_NAME, RunLock
from kdlab.methods import check_recipe
from kdlab.recipe_files import dump, validate
from kdlab.student import RESULT, Data, Log, build_model, load_data, read_result, train_run
from kdlab.teachers import (
    best_weights,
    cache_root,
    describe_teachers,
    generation_zero,
    load_model_weights,
    prepare_teacher,
    teacher_seed,
    trained_teachers,
)


def check_protocol(recipe: Recipe, data: Data, cfg: TrainConfig, seed: int, what: str) -> None:
    """What fit would refuse at its first step (the device, a batch larger than the data, the seed), checked on a
    CPU loader that shares the data's memory (or, streamed, reads nothing yet): the student's protocol must not
    fail after its teachers trained."""
    try:
        device = resolve_device(cfg.device)
        distributed.check_device(device)
        data.train_loader(recipe, cfg.batch_size, "cpu", seed)  # a stream loader decodes nothing until iterated
    except KdlabError as e:
        raise type(e)(f"{what}: {e}") from None


@torch.no_grad()
def preflight(recipe: Recipe, data: Data) -> None:
    """Untrained copies of the student and teachers, wired and probed with one batch, and every protocol and
    given weights file checked, so a wrong layer name, tapped shapes that do not fit, a missing teacher file or
    an impossible batch fail now rather than after hours of teacher training."""
    check_protocol(recipe, data, recipe.train, recipe.seed, "train")
    for i, t in trained_teachers(recipe):
        check_protocol(
            recipe,
            data,
            teacher_train_config(recipe, t),
            teacher_seed(recipe, i, t),
            f"teachers.{i}.train" if not recipe.generations else "generation 0",
        )
    student = build_model(recipe.student.name, recipe.student.kwargs, data, recipe.seed)
    specs = recipe.teachers or ([recipe.student] if recipe.generations else [])
    teachers = [build_model(t.name, t.kwargs, data, recipe.seed) for t in specs]
    for i, (t, model) in enumerate(zip(recipe.teachers, teachers)):
        if t.weights:  # read in full once here: absent, corrupt, unsafe or of another shape
            load_model_weights(model, Path(t.weights), f"teacher {i}")
    distiller = Distiller(student, teachers, recipe.loss)
    probe = data.test if len(data.test.labels) >= len(data.train.labels) else data.train
    n = min(recipe.train.batch_size, len(probe.labels))  # terms such as lp need a batch the size of training's
    images = probe.first_images(n) if data.streamed else probe.images[:n]  # streamed: n files decoded here
    x, y = images.float().div(255), probe.labels[:n]
    distiller.build(x[:8], y[:8])
    distiller.attach_training_set(data.train.labels)
    distiller.train()(x, y, progress=0.0, indices=torch.arange(n))  # the terms' own shape checks run in their forward


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
    return any(
        (d / "checkpoints" / name).exists() or (d / RESULT).exists()
        for d in dirs
        for name in ("last.safetensors", "prev.safetensors")
    )


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
    from kdlab.recipe_files import read_yaml

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
            raise ConfigError(
                f"{out} is not empty ({shown}) and is not a kdlab run; choose a new or empty folder "
                "for --out (nothing was changed)"
            )
    if config_path.exists():
        try:
            old = validate(read_yaml(config_path), source=str(config_path))
        except KdlabError:
            raise ConfigError(
                f"{out} holds a config.yaml that is not a kdlab recipe; choose a new or empty folder "
                "for --out (nothing was changed)"
            ) from None
        foreign = _foreign(out)
        if has_progress(out) or foreign:
            what = f" and {', '.join(foreign[:3])}" if foreign else ""
            raise ConfigError(
                f"{out} already holds a run{what}; continue it with 'kdlab train --resume {out}' "
                "or choose another --out"
            )
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
        if data.streamed:
            log(
                f"data: streamed from {recipe.data.root} (data.loader={recipe.data.loader}), {len(data.train)} train "
                f"images decoded by {data.workers} worker(s) per epoch; file index {data.train.index_path}"
            )
        for split, ds in (("train", data.train), ("test", data.test)):
            if ds.skipped:
                log(
                    f"data: {len(ds.skipped)} unreadable file(s) left out of {split} (data.skip_unreadable); "
                    f"first: {ds.skipped[0]}"
                )
        preflight(recipe, data)
        describe_teachers(recipe, out, log)
        if recipe.generations:
            return run_generations(recipe, out, data, log)
        teachers, infos = [], []
        for i, t in enumerate(recipe.teachers):
            model, info = prepare_teacher(recipe, i, t, data, out, log)
            teachers.append(model)
            infos.append(info)
        return train_run(
            out,
            recipe,
            recipe.student.name,
            recipe.student.kwargs,
            teachers,
            recipe.loss,
            recipe.train,
            recipe.seed,
            data,
            log,
            extra={"teachers": infos},
            logits_cache=cache_root(recipe, out) / "logits",
        )


def check_run_options(recipe: Recipe, world: int, cuda: bool) -> None:
    """The device-dependent refusals of every train section the recipe will run (its teachers' first),
    so that a combination that cannot work fails before hours of teacher training."""
    # a sequential recipe's generation 0 trains with recipe.train itself
    sections = (
        []
        if recipe.generations
        else [(f"teachers.{i}.train", teacher_train_config(recipe, t)) for i, t in trained_teachers(recipe)]
    )
    for where, cfg in [*sections, ("train", recipe.train)]:
        device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
        check_device_options(cfg, device_type, world, where)


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
        history = [
            {"generation": i, "top1_last": r["top1_last"], "top1_best": r["top1_best"]} for i, r in enumerate(results)
        ]
        extra = {
            "generation": g,
            "generations": history,
            "teachers": [
                {
                    "name": recipe.student.name,
                    "source": str(gen_dirs[g - 1]),
                    "top1_last": results[-1]["top1_last"],
                    "checkpoint": recipe.generation_checkpoint,
                    "top1": results[-1].get("top1_selected", results[-1]["top1_best"])
                    if best
                    else results[-1]["top1_last"],
                }
            ],
        }
        glog = log if g == gens else log.child(gen_dirs[g] / "log.txt", f"[gen {g}] ")
        # a generation that teaches the next one keeps its best weights when those are the ones that teach
        train_cfg = recipe.train.model_copy(update={"keep_best": True}) if best and g < gens else recipe.train
        results.append(
            train_run(
                gen_dirs[g],
                recipe,
                recipe.student.name,
                recipe.student.kwargs,
                [teacher],
                recipe.loss,
                train_cfg,
                recipe.seed + g,
                data,
                glog,
                extra=extra,
                init=initial_weights(source) if recipe.generation_init == "previous" else None,
                logits_cache=cache_root(recipe, gen_dirs[g]) / "logits",
            )
        )
    final = dict(results[-1])
    final["generations"] = [
        {"generation": i, "top1_last": r["top1_last"], "top1_best": r["top1_best"]} for i, r in enumerate(results)
    ]
    if recipe.bane and gens >= 1:
        final["bane_top1"] = ensemble_top1(recipe, data, gen_dirs[1:])
        log(f"BANE (generations 1..{gens}) top-1 {final['bane_top1']:.2f}")
    if distributed.is_main():
        checkpoint.atomic_write_text(out / RESULT, json.dumps(final, indent=2) + "\n")
    distributed.barrier()
    return final


def initial_weights(source: Path) -> Callable[[torch.nn.Module], None]:
    """A generation's start from the previous one's weights, in place of the fresh initialisation."""
    return lambda student: load_model_weights(student, source, "initial weights")


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
        counts += torch.stack(
            [(probs.argmax(1) == y).sum(), y.new_full((), y.numel())]
        ).double()  # no host-to-device copy
    if test_loader.shard[1] > 1:
        distributed.all_reduce_sum(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


def _configured_device(recipe: Recipe | None, out: Path) -> str:
    """train.device of the recipe, or of the run being resumed (read before any rank may write there)."""
    if recipe is not None:
        return recipe.train.device
    try:
        from kdlab.recipe_files import read_yaml

        return str((read_yaml(out / "config.yaml").get("train") or {}).get("device", "auto"))
    except (KdlabError, AttributeError):
        return "auto"  # start() reports what is wrong with the directory
