"""Bad input, fuzzed: hypothesis generates invalid recipes and --set overrides; each one must make
`kdlab train` exit 2 with exactly one stderr line naming the problem, never a traceback, and never
leave a run directory that looks finished.

An input reaches kdlab either as `--set KEY=VALUE` on a valid recipe or written into a recipe file.
Every generated input is invalid by construction (the strategy knows why), and the line must name
that reason: the key, the bad name, the missing path or the layer.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlab import models
from kdlab.cli import main
from kdlab.config import (
    AugmentConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    Recipe,
    ScheduleConfig,
    TeacherConfig,
    TrainConfig,
)
from kdlab.losses import TERMS
from kdlab.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
KD = ROOT / "recipes" / "digits" / "kd.yaml"
BASE = ["train.epochs=2", "train.max_steps_per_epoch=1"]

SECTIONS = {
    "": Recipe,
    "train": TrainConfig,
    "train.schedule": ScheduleConfig,
    "data": DataConfig,
    "data.augment": AugmentConfig,
    "student": ModelConfig,
    "teachers.0": TeacherConfig,
    "loss": LossConfig,
    "loss.terms.kd": TERMS["kd"].Options,
    "teachers.0.train": TrainConfig,
}

identifier = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
# strings YAML keeps as strings and no number or boolean parser accepts ("q" starts no number, no yes/no/nan/inf)
word = st.from_regex(r"q[a-z]{0,8}", fullmatch=True)


def yaml_value(value) -> str:
    return json.dumps(value)  # JSON is YAML: the --set parser reads it back as this very value


@st.composite
def unknown_keys(draw):
    section = draw(st.sampled_from(sorted(SECTIONS)))
    name = draw(identifier.filter(lambda n: n not in SECTIONS[section].model_fields))
    key = f"{section}.{name}" if section else name
    if draw(st.booleans()):  # a whole unknown subtree
        key += "." + draw(identifier)
    value = draw(st.one_of(st.integers(-5, 5), word))
    needle = key.split(".", 2)[0] if section == "" else f"{section}.{name}"
    return [f"{key}={yaml_value(value)}"], [needle], "unknown key"


INT_KEYS = [
    "train.epochs",
    "train.batch_size",
    "train.eval_every",
    "train.max_steps_per_epoch",
    "train.schedule.step_size",
    "data.image_size",
    "data.augment.crop_pad",
    "seed",
    "generations",
    "teachers.0.epoch",
    "teachers.0.train.epochs",
]
FLOAT_KEYS = [
    "train.lr",
    "train.momentum",
    "train.weight_decay",
    "train.grad_clip",
    "train.schedule.gamma",
    "train.schedule.warmup_epochs",
    "train.schedule.min_lr",
    "loss.ce",
    "data.augment.rotation",
]
TERM_FLOAT_KEYS = ["loss.terms.kd.weight", "loss.terms.kd.T"]  # pydantic defaults there: booleans would pass as 1.0
BOOL_KEYS = ["train.nesterov", "train.decay_norm_and_bias", "train.compile", "bane", "data.augment.flip"]
CHOICE_KEYS = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("auto", "bf16", "off"),
    "train.nonfinite": ("stop", "skip"),
    "train.schedule.type": ("multistep", "step", "cosine", "constant"),
    "data.name": ("digits", "cifar10", "cifar100", "imagefolder"),
}
LIST_KEYS = ["train.schedule.milestones", "train.keep_epochs"]
SECTION_KEYS = ["train", "data", "student", "loss", "loss.terms", "train.schedule", "student.kwargs", "teachers"]

containers = st.one_of(
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.dictionaries(word, st.integers(0, 3), min_size=1, max_size=2),
)
fractional = st.floats(0.01, 50).filter(lambda f: f != int(f))


@st.composite
def wrong_types(draw):
    kind = draw(st.sampled_from(["float", "int", "bool", "choice", "list", "section", "term_float"]))
    if kind == "int":
        key, value = draw(st.sampled_from(INT_KEYS)), draw(st.one_of(word, containers, fractional, st.booleans()))
    elif kind == "float":
        key, value = draw(st.sampled_from(FLOAT_KEYS)), draw(st.one_of(word, containers, st.booleans()))
    elif kind == "term_float":
        key, value = draw(st.sampled_from(TERM_FLOAT_KEYS)), draw(st.one_of(word, containers))
    elif kind == "bool":
        key, value = draw(st.sampled_from(BOOL_KEYS)), draw(st.one_of(word, containers, st.integers(2, 99), fractional))
    elif kind == "choice":
        key = draw(st.sampled_from(sorted(CHOICE_KEYS)))
        value = draw(st.one_of(word, st.integers(-3, 99), containers))
    elif kind == "list":
        key, value = (
            draw(st.sampled_from(LIST_KEYS)),
            draw(
                st.one_of(
                    word,
                    st.dictionaries(word, st.integers(), min_size=1, max_size=2),
                    st.lists(word, min_size=1, max_size=2),
                )
            ),
        )
    else:
        key, value = (
            draw(st.sampled_from(SECTION_KEYS)),
            draw(st.one_of(word, st.integers(-3, 3), st.lists(st.integers(), min_size=1, max_size=2))),
        )
    needle = "loss.terms.kd" if key.startswith("loss.terms.kd") else key
    return [f"{key}={yaml_value(value)}"], [needle], f"wrong type ({kind})"


def _nonfinite():
    return st.sampled_from([".nan", ".inf", "-.inf"])


def _num(strategy):
    return strategy.map(repr)


OUT_OF_RANGE = {
    "train.lr": st.one_of(_num(st.floats(-1e6, 0)), _nonfinite()),
    "train.epochs": _num(st.integers(-1000, 0)),
    "train.batch_size": _num(st.integers(-1000, 0)),
    "train.momentum": st.one_of(_num(st.floats(1, 1e3)), _num(st.floats(-1e3, -1e-9)), _nonfinite()),
    "train.weight_decay": st.one_of(_num(st.floats(-1e3, -1e-9)), _nonfinite()),
    "train.eval_every": _num(st.integers(-10, 0)),
    "train.grad_clip": st.one_of(_num(st.floats(-1e3, 0)), _nonfinite()),
    "train.max_steps_per_epoch": _num(st.integers(-10, 0)),
    "train.schedule.gamma": st.one_of(_num(st.floats(1.0001, 1e3)), _num(st.floats(-10, 0)), _nonfinite()),
    "train.schedule.step_size": _num(st.integers(-10, 0)),
    "train.schedule.warmup_epochs": st.one_of(_num(st.floats(-100, -1e-9)), _nonfinite()),
    "train.schedule.min_lr": st.one_of(_num(st.floats(-1, -1e-9)), _nonfinite()),
    "train.schedule.milestones": st.one_of(
        st.lists(st.integers(1, 300), min_size=2, max_size=4, unique=True).map(lambda v: sorted(v, reverse=True)),
        st.lists(st.integers(-50, 0), min_size=1, max_size=3),
    ).map(yaml_value),
    "train.keep_epochs": st.lists(st.one_of(st.integers(-50, -1), st.integers(3, 500)), min_size=1, max_size=3).map(
        yaml_value
    ),
    "data.image_size": _num(st.integers(-10, 7)),
    "data.augment.rotation": st.one_of(_num(st.floats(180.001, 1e4)), _num(st.floats(-1e3, -1e-9)), _nonfinite()),
    "data.augment.crop_pad": _num(st.integers(-10, -1)),
    "loss.ce": st.one_of(_num(st.floats(-1e3, -1e-9)), _nonfinite()),
    "generations": _num(st.integers(-10, -1)),
    "teachers.0.epoch": _num(st.one_of(st.integers(-10, -1), st.integers(3, 99))),
    "teachers.0.train.lr": _num(st.floats(-1, 0)),
    "loss.terms.kd.T": st.one_of(_num(st.floats(-1e3, 0)), _nonfinite()),
    "loss.terms.kd.weight": st.one_of(
        _num(st.floats(-1e3, -1e-9)), _nonfinite(), st.sampled_from(["true", "no", "on"])
    ),
    "seed": _num(st.integers(-(10**6), -1)),
}


@st.composite
def out_of_range(draw):
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    raw = draw(OUT_OF_RANGE[key])
    needle = {"seed": "seed"}.get(key, key)
    return [f"{key}={raw}"], [needle], "out of range"


@st.composite
def unknown_names(draw):
    what = draw(st.sampled_from(["student.name", "teachers.0.name", "method", "term"]))
    name = draw(word.filter(lambda n: n not in models.names() and n not in METHODS and n not in TERMS))
    if what == "term":
        return [f"loss.terms.{name}={{}}"], [name], "unknown term"
    return [f"{what}={name}"], [name], f"unknown {what}"


@st.composite
def missing_data(draw):
    name = draw(st.sampled_from(["cifar100", "cifar10", "imagefolder"]))
    root = f"{draw(st.sampled_from(['/nonexistent', '/tmp/kdlab-no-such-dir']))}/{draw(identifier)}"
    return [f"data.name={name}", f"data.root={root}"], [root], "missing data"


STAGES = ["stage1", "stage2", "stage3"]


@st.composite
def layer_mismatches(draw):
    term, kind = draw(
        st.sampled_from(
            [
                ("at", "shapes"),
                ("at", "no such layer"),
                ("nst", "count"),
                ("at", "shapes"),
                ("fitnet", "no such layer"),
                ("at", "count"),
                ("nst", "no such layer"),
                ("fitnet", "count"),
            ]
        )
    )
    method = term
    if kind == "no such layer":
        bad = draw(word)  # no module or stage alias of the zoo starts with q
        side = draw(st.sampled_from(["student_layers", "teacher_layers"]))
        opts, needles = {side: [bad]}, [bad]
    elif kind == "count":
        n = draw(st.integers(1, 2))
        opts = {"student_layers": STAGES[:n], "teacher_layers": STAGES[: n + 1]}
        needles = [term, "layer"]
    else:  # stages whose maps differ in size, without pool
        s, t = draw(st.sampled_from([(a, b) for a in STAGES for b in STAGES if a != b]))
        opts, needles = {"student_layers": [s], "teacher_layers": [t]}, ["spatial sizes differ"]
    return [f"method={method}", "loss.terms={}", f"loss.terms.{term}={json.dumps(opts)}"], needles, f"layers ({kind})"


CATEGORIES = {  # strategy, examples
    "unknown keys": (unknown_keys(), 15),
    "wrong types": (wrong_types(), 25),
    "out of range": (out_of_range(), 25),
    "unknown names": (unknown_names(), 12),
    "missing data": (missing_data(), 6),
    "layer mismatches": (layer_mismatches(), 12),
}


def _set_dotted(raw: dict, key: str, value) -> None:
    """The test's own setter for writing an override into a recipe file."""
    parts, node = key.split("."), raw
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if node is None:
            return
    if isinstance(node, list):
        node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value


GENERATED: dict[str, int] = {}


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_fuzzed_bad_input_exits_2_with_one_line_and_no_result(category):
    strategy, examples = CATEGORIES[category]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"  # one teacher trained at most once for every example that gets that far

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(case=strategy, as_file=st.booleans())
        def check(case, as_file):
            overrides, needles, kind = case
            GENERATED[kind] = GENERATED.get(kind, 0) + 1
            n = sum(GENERATED.values())
            out = tmp / f"run{n}"
            recipe, items = KD, [*BASE, f"cache_dir={cache}", *overrides]
            if as_file:  # the same input, written into the recipe itself
                raw = yaml.safe_load(KD.read_text())
                for item in items:
                    key, value = item.split("=", 1)
                    _set_dotted(raw, key, yaml.safe_load(value))
                recipe, items = tmp / f"recipe{n}.yaml", []
                recipe.write_text(yaml.safe_dump(raw))
            args = ["train", str(recipe), "--out", str(out), "--quiet"]
            for item in items:
                args += ["--set", item]
            err, stdout = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
                rc = main(args)
            lines = err.getvalue().strip().splitlines()
            assert rc == 2, (kind, args, err.getvalue())
            assert len(lines) == 1 and lines[0].startswith("kdlab: error: "), (kind, args, err.getvalue())
            for needle in needles:
                assert needle in lines[0], (kind, needle, lines[0])
            assert not (out / "result.json").exists() and not (out / "student.safetensors").exists()

        before = sum(GENERATED.values())
        check()
    made = sum(GENERATED.values()) - before
    assert made >= examples // 2
    print(
        f"\n{category}: {made} invalid inputs; all categories so far: {sum(GENERATED.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(GENERATED.items()))})"
    )
