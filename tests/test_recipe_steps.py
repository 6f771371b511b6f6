"""Every recipe kdlab ships runs: each recipe file and each cell of each table builds its models and takes one
real-shape training step (pre-stages included, one step each) on random data of the recipe's image size.

A recipe that cannot run cannot ship: a tap that does not exist, maps that do not fit (ShuffleNetV2's AT and
FT once raised `spatial sizes differ` on their first batch), an option a model rejects all fail here, in
seconds, rather than on a GPU hours into a run. Recipes that differ only in what a single step cannot see
(epochs, milestones, seeds, kept epochs, which checkpoint teaches) share one step, so the whole set costs
about a minute on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlab.config import Recipe
from kdlab.data import ArrayDataset
from kdlab.distiller import Distiller
from kdlab.optim import lr_at, make_optimizer
from kdlab.recipe_files import load_recipe
from kdlab.stages import StageContext, run_stages
from kdlab.student import Data, build_model
from kdlab.tools.reproduce import build_recipe, load_table

RECIPES = Path(__file__).resolve().parents[1] / "kdlab" / "recipes"
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagefolder": 1000}
CHANNELS = {"digits": 1}
SIZES = {"digits": 8, "cifar10": 32, "cifar100": 32}


def shipped() -> list[tuple[str, Recipe]]:
    """(name, recipe) of every recipe file and of every table cell (seed 0), validated as `kdlab` validates them."""
    out = []
    for path in sorted(RECIPES.rglob("*.yaml")):
        rel = path.relative_to(RECIPES)
        if rel.parts[0] == "tables":
            table = load_table(path)
            for cell in table.cells:
                out.append(
                    (f"{rel}:{cell.name}", build_recipe(table, path, cell, 0, Path("/nonexistent/out"), [], None))
                )
        else:
            out.append((str(rel), load_recipe(path)))
    return out


def step_signature(recipe: Recipe) -> str:
    """What one training step of the recipe depends on."""
    raw = recipe.model_dump(mode="json")
    teachers = [{"name": t["name"], "kwargs": t["kwargs"]} for t in raw["teachers"]]
    train = {
        k: v
        for k, v in raw["train"].items()
        if k in ("lr", "momentum", "nesterov", "weight_decay", "decay_norm_and_bias", "grad_clip", "channels_last")
    }
    train["lr0"] = lr_at(recipe.train, 0.0)
    train["fold_teacher"] = recipe.train.fast.fold_teacher
    return json.dumps(
        {
            "data": raw["data"] | {"root": None},
            "student": raw["student"],
            "teachers": teachers,
            "generations": bool(recipe.generations),
            "loss": raw["loss"],
            "train": train,
        },
        sort_keys=True,
    )


def _grouped() -> list[tuple[str, Recipe, list[str]]]:
    groups: dict[str, tuple[str, Recipe, list[str]]] = {}
    for name, recipe in shipped():
        key = step_signature(recipe)
        if key in groups:
            groups[key][2].append(name)
        else:
            groups[key] = (name, recipe, [name])
    return list(groups.values())


GROUPS = _grouped()


TRAIN_SIZES = {"digits": 1437, "cifar10": 50_000, "cifar100": 50_000}  # the real training sets' sizes


def random_data(recipe: Recipe, n: int, n_train: int | None = None) -> Data:
    """Random train and test images of the recipe's data set shape (the real files are not needed for one step):
    `n` of each, or `n_train` training images for a term that keeps state per training sample."""
    name = recipe.data.name
    c, size, k = CHANNELS.get(name, 3), SIZES.get(name, recipe.data.image_size), NUM_CLASSES[name]
    g = torch.Generator().manual_seed(0)

    def split(which: str, count: int) -> ArrayDataset:
        return ArrayDataset(
            torch.randint(0, 256, (count, c, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, k, (count,), generator=g),
            k,
            (0.5,) * c,
            (0.25,) * c,
            [str(i) for i in range(k)],
            name,
            source=f"random {which}",
        )

    return Data(split("train", n_train or n), split("test", n), k, c)


@torch.no_grad()
def calibrated(teacher: torch.nn.Module, data: Data) -> torch.nn.Module:
    """The teacher with BatchNorm statistics of the data, as training leaves them: a freshly initialised deep net
    in eval mode (running variance 1) blows its maps up block after block (resnet110's last map reaches 1e9 and
    FT's paraphraser overflows), which no trained teacher does."""
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    teacher.train()
    teacher(data.test.images.float().div(255).sub(0.5).div(0.25))  # the few test images, not a real-size train set
    return teacher.eval()


def one_step(recipe: Recipe, tmp_path: Path) -> dict[str, float]:
    """Build the recipe's student, teachers and terms, run every pre-stage for one step, then one optimizer step."""
    torch.manual_seed(0)
    terms = {name: dict(opts or {}) for name, opts in recipe.loss.terms.items()}
    for opts in terms.values():  # one epoch of each pre-stage (the stage itself is capped at one step below)
        for key in ("hint_epochs", "paraphraser_epochs"):
            if key in opts:
                opts[key] = 1
    loss_cfg = recipe.loss.model_copy(update={"terms": terms})
    # a kNN term needs more samples than neighbours; every other term runs at batch 2
    batch = max([2] + [int(opts.get("k", 5)) + 1 for name, opts in terms.items() if name == "lp"])
    # the teacher-logit cache is left out: it reproduces the online teachers (tests/test_fast.py), which run here
    cfg = recipe.train.model_copy(
        update={"batch_size": batch, "device": "cpu", "max_steps_per_epoch": 1, "teacher_cache": False}
    )
    # CRD's memory bank holds one entry per training sample and draws its negatives among them: a real-size set,
    # except for an image folder (ImageNet's 1.28M random 224-px images would not fit): a bank of 1,024 there, with
    # nce_k cut to what it holds
    n_train = None
    if "crd" in terms and recipe.data.name in TRAIN_SIZES:
        n_train = TRAIN_SIZES[recipe.data.name]
    elif "crd" in terms:
        n_train = 1024
        terms["crd"]["nce_k"] = min(int(terms["crd"].get("nce_k", 16384)), 64)
        loss_cfg = recipe.loss.model_copy(update={"terms": terms})
    data = random_data(recipe, batch, n_train)
    device = torch.device("cpu")
    student = build_model(recipe.student.name, recipe.student.kwargs, data, recipe.seed)
    specs = recipe.teachers or ([recipe.student] if recipe.generations else [])
    teachers = [calibrated(build_model(t.name, t.kwargs, data, recipe.seed), data) for t in specs]
    distiller = Distiller(student, teachers, loss_cfg).to(device)
    train_loader, test_loader = data.loaders(recipe, batch, device, recipe.seed)
    x, y = next(iter(test_loader))
    distiller.build(x, y)
    distiller.attach_training_set(data.train.labels)  # as train_run does (CRD's memory bank)
    if teachers and cfg.fast.fold_teacher:
        from kdlab.fast.teachers import prepare_teachers

        prepare_teachers(
            distiller, data.train, train_loader, cfg, None, lambda: torch.autocast("cpu", enabled=False), lambda m: None
        )
    ctx = StageContext(
        student=student,
        teachers=distiller.teachers,
        train_loader=train_loader,
        device=device,
        run_dir=tmp_path,
        autocast=lambda: torch.autocast("cpu", enabled=False),
        log=lambda m: None,
        forward=distiller.outputs,
        max_steps=1,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    run_stages(ctx, distiller.terms.values())
    opt = make_optimizer(distiller, cfg, device)
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, 0.0)
    before = [p.detach().clone() for p in distiller.student.parameters()]
    distiller.train()
    train_loader.set_epoch(0)
    x, y, index, _view = next(train_loader.iter_batches(with_meta=True))
    assert x.shape[-2:] == (data.train.images.shape[-2:]), "the step must see the recipe's image size"
    extra = {}  # what fit passes to the terms that read it (DKD's warm-up, indexed terms)
    if distiller.needs_progress:
        extra["progress"] = torch.zeros(())
    if distiller.needs_indices:
        extra["indices"] = index
    loss, logits, values = distiller(x, y, **extra)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    assert logits.shape == (batch, data.num_classes)
    assert all(torch.isfinite(v) for v in values.values()), values
    if lr_at(cfg, 0.0) > 0:
        assert any(not torch.equal(a, b) for a, b in zip(before, distiller.student.parameters())), (
            "the step changed nothing"
        )
    # the terms of the main stage must all be there (a two-stage term's own stage ran in run_stages above)
    main = [n for n, t in distiller.terms.items() if t.active_in_main]
    assert set(main) <= set(values), (main, sorted(values))
    return {k: float(v.detach()) for k, v in values.items()}


def test_every_shipped_recipe_and_table_cell_is_covered():
    names = [n for group in GROUPS for n in group[2]]
    files = {str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml") if p.parent.name != "tables"}
    assert files <= set(names)
    assert any(":" in n for n in names)  # the tables' cells too
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name,recipe,members", GROUPS, ids=[g[0] for g in GROUPS])
def test_recipe_takes_one_training_step(name, recipe, members, tmp_path):
    torch.set_num_threads(1)
    one_step(recipe, tmp_path)
