"""CTKD (Li et al., AAAI 2023): the learned temperature, its gradient reversal and curriculum, and the
term's own optimizer group. References are float64 loops from the official code's equations
(zhengli97/CTKD: `train_student.py` CosineDecay, `helper/loops.py`, `distiller_zoo/KD.py`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.config import LossConfig, TrainConfig
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError
from kdlab.losses.ctkd import CTKD, curriculum_lambda
from kdlab.optim import make_optimizer
from kdlab.recipe_files import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "kdlab" / "recipes"


def ref_lambda(epoch_1based: int, loops=10, vmax=0.0, vmin=-1.0) -> float:
    i = min(max(epoch_1based, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (vmax - vmin) + vmin


def ref_kd(zs, zt, T) -> float:
    total = 0.0
    for n in range(len(zs)):
        ls = [v / T for v in zs[n]]
        lt = [v / T for v in zt[n]]
        ms, mt = max(ls), max(lt)
        zs_ = math.log(sum(math.exp(v - ms) for v in ls)) + ms
        zt_ = math.log(sum(math.exp(v - mt) for v in lt)) + mt
        for a, b in zip(ls, lt):
            pt = math.exp(b - zt_)
            total += pt * ((b - zt_) - (a - zs_))
    return T * T * total / len(zs)


def _distiller(terms, ce=0.1):
    student, teacher = nn.Linear(6, 5), nn.Linear(6, 5)
    return Distiller(student, [teacher], LossConfig(ce=ce, terms=terms))


def test_curriculum_matches_the_official_cosine_decay():
    for completed in range(0, 15):
        assert curriculum_lambda(float(completed)) == pytest.approx(ref_lambda(completed + 1), abs=1e-12)
        t = curriculum_lambda(torch.tensor(completed + 0.5, dtype=torch.float64))
        assert float(t) == pytest.approx(ref_lambda(completed + 1), abs=1e-12)
    assert curriculum_lambda(0.0) < 0 and curriculum_lambda(20.0) == pytest.approx(-1.0)


@pytest.mark.parametrize("progress", [0.0, 3.0, 12.0])
def test_loss_and_reversed_gradient_against_float64_reference(progress):
    torch.manual_seed(0)
    d = _distiller({"ctkd": {"weight": 1.0, "base": "kd", "theta_init": 0.3}}).double()
    term: CTKD = d.terms["ctkd"]
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    out = d.outputs(x, y, progress=progress)
    value = term(out)
    theta = 0.3
    tau = 1 + 20 / (1 + math.exp(-theta))
    zs, zt = out.logits.tolist(), out.teacher_logits[0].tolist()
    assert float(value.detach()) == pytest.approx(ref_kd(zs, zt, tau), rel=1e-10)
    value.backward()
    # d loss / d theta by central differences through tau, then the official reversal scale lambda
    eps = 1e-6

    def at(th):
        return ref_kd(zs, zt, 1 + 20 / (1 + math.exp(-th)))

    dloss = (at(theta + eps) - at(theta - eps)) / (2 * eps)
    lam = ref_lambda(int(progress) + 1)
    assert float(term.theta.grad) == pytest.approx(lam * dloss, rel=1e-5, abs=1e-9)
    assert lam < 0  # the temperature's gradient is the negated (scaled) gradient: it ascends the loss
    # the student's gradient is not reversed: it matches the plain KD term at the same (fixed) temperature
    g_ctkd = d.student.weight.grad.clone()
    d.zero_grad()
    plain = _distiller({"kd": {"weight": 1.0, "T": tau}}).double()
    plain.student.load_state_dict(d.student.state_dict())
    plain.teachers[0].load_state_dict(d.teachers[0].state_dict())
    plain.terms["kd"](plain.outputs(x, y)).backward()
    torch.testing.assert_close(g_ctkd, plain.student.weight.grad)


def test_dkd_base_gets_the_learned_temperature():
    from kdlab.losses.dkd import dkd

    torch.manual_seed(1)
    d = _distiller({"ctkd": {"base": "dkd", "base_options": {"beta": 2.0, "warmup_epochs": 0}}}).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 5, (5,))
    out = d.outputs(x, y, progress=2.0)
    tau = 1 + 20 / (1 + math.exp(-1.0))
    expected = dkd(out.logits, out.teacher_logits[0], y, 1.0, 2.0, tau)
    torch.testing.assert_close(d.terms["ctkd"](out), expected)


def test_the_parameter_group_options_reach_the_optimizer():
    d = _distiller({"ctkd": {"lr_scale": 0.5, "weight_decay": 1e-3}})
    cfg = TrainConfig(lr=0.2, weight_decay=5e-4, decay_norm_and_bias=False)
    opt = make_optimizer(d, cfg, torch.device("cpu"))
    theta = d.terms["ctkd"].theta
    groups = [g for g in opt.param_groups if any(p is theta for p in g["params"])]
    assert len(groups) == 1 and groups[0]["params"] == [theta]
    assert groups[0]["weight_decay"] == 1e-3 and groups[0]["lr_scale"] == 0.5
    assert sum(any(p is theta for p in g["params"]) for g in opt.param_groups) == 1  # not also a student group
    # default: train.weight_decay even though theta is 1-d (the student's 1-d parameters are exempted here)
    d2 = _distiller({"ctkd": {}})
    opt2 = make_optimizer(d2, cfg, torch.device("cpu"))
    (g,) = [g for g in opt2.param_groups if any(p is d2.terms["ctkd"].theta for p in g["params"])]
    assert g["weight_decay"] == 5e-4 and g["lr_scale"] == 1.0


def test_the_loop_scales_the_groups_learning_rate(tmp_path):
    from kdlab import train as train_mod

    d = _distiller({"ctkd": {"lr_scale": 0.25}})
    cfg = TrainConfig(lr=0.1, epochs=1, batch_size=4)
    opt = make_optimizer(d, cfg, torch.device("cpu"))
    seen = {}

    class Run:
        pass

    run = Run()
    run.opt, run.cfg, run.distiller = opt, cfg, d
    for g in opt.param_groups:  # what _train_epoch does each step
        g["lr"] = train_mod.lr_at(cfg, 0.0) * g.get("lr_scale", 1.0)
        seen[g.get("name", "student")] = g["lr"]
    assert seen["ctkd.temperature"] == pytest.approx(0.025) and seen["student"] == pytest.approx(0.1)


def test_bad_base_is_refused_in_one_line():
    with pytest.raises(Exception, match="does not take a learned temperature"):
        LossConfig(ce=0.1, terms={"ctkd": {"base": "sp"}})
    with pytest.raises(Exception, match="base_options.T"):
        LossConfig(ce=0.1, terms={"ctkd": {"base_options": {"T": 4}}})


def test_graph_step_is_refused():
    recipe = load_recipe(RECIPES / "digits" / "ctkd.yaml")
    raw = recipe.model_dump(mode="json")
    raw["train"]["fast"] = {"graph_step": True}
    from kdlab.config import Recipe
    from kdlab.methods import check_recipe

    with pytest.raises((ConfigError, ValueError), match="graph_step"):
        check_recipe(Recipe.model_validate(raw))


def test_digits_recipe_trains_two_epochs_and_the_temperature_moves(tmp_path):
    from kdlab.data import ArrayDataset, DeviceLoader
    from kdlab.train import fit

    torch.manual_seed(0)
    recipe = load_recipe(RECIPES / "digits" / "ctkd.yaml")
    ds = ArrayDataset(
        images=torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8),
        labels=torch.randint(0, 10, (64,)),
        num_classes=10,
        mean=(0.5,),
        std=(0.25,),
        class_names=[str(i) for i in range(10)],
        name="digits",
    )
    from kdlab.models import create

    student, teacher = (create(n, num_classes=10, in_chans=1) for n in ("smallcnn_narrow", "smallcnn_wide"))
    d = Distiller(student, [teacher], recipe.loss)
    loader = DeviceLoader(ds, 16, train=True)
    x, y = next(iter(loader))
    d.build(x, y)
    cfg = recipe.train.model_copy(update={"epochs": 2})
    before = float(d.terms["ctkd"].theta.detach())
    fit(d, loader, None, cfg, tmp_path, log=lambda s: None)
    assert float(d.terms["ctkd"].theta) != before
