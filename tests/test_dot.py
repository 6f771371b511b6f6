"""DOT (Zhao et al., ICCV 2023) against a float64 loop written from the official optimizer
(megvii-research/mdistiller, mdistiller/engine/dot.py): a task buffer with momentum - delta and the weight decay,
a distillation buffer with momentum + delta, the mean momentum for a parameter that only one loss reaches."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import ROOT, ok, refused, sets

from kdlab import distributed, methods
from kdlab.config import TrainConfig, teacher_train_config
from kdlab.dot import DistillationOrientedSGD
from kdlab.recipe_files import load_recipe
from kdlab.tools.cost import passes_per_step


def ref_dot_step(params, task_grads, kd_grads, state, lr, wd, m_task, m_kd):
    """One step on lists of floats; grads None where a loss does not reach the parameter; state per parameter."""
    m_mean = (m_task + m_kd) / 2
    for i, p in enumerate(params):
        gt, gk, st = task_grads[i], kd_grads[i], state[i]
        if gt is not None:
            d = [g + wd * v for g, v in zip(gt, p)]
            if "task" not in st:
                st["task"] = list(d)
            else:
                m = m_task if gk is not None else m_mean
                st["task"] = [m * b + x for b, x in zip(st["task"], d)]
            p[:] = [v - lr * b for v, b in zip(p, st["task"])]
        if gk is not None:
            if "kd" not in st:
                st["kd"] = list(gk)
            elif gt is not None:
                st["kd"] = [m_kd * b + g for b, g in zip(st["kd"], gk)]
            else:
                st["kd"] = [m_mean * b + g + wd * v for b, g, v in zip(st["kd"], gk, p)]
            p[:] = [v - lr * b for v, b in zip(p, st["kd"])]


def test_updates_match_the_official_equations_for_every_kind_of_parameter():
    g = torch.Generator().manual_seed(0)
    # both losses reach p0; only the task p1; only the distillation p2; p3 in a group of its own (no decay, lr x2)
    params = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    groups = [{"params": params[:3], "weight_decay": 5e-4}, {"params": params[3:], "weight_decay": 0.0}]
    opt = DistillationOrientedSGD(groups, lr=0.1, momentum_task=0.825, momentum_distill=0.975)
    ref = [p.detach().tolist() for p in params]
    ref_state = [{} for _ in params]
    reach = [(True, True), (True, False), (False, True), (True, True)]
    for step in range(4):
        for group, lr in zip(opt.param_groups, (0.1 / (step + 1), 0.2 / (step + 1))):
            group["lr"] = lr
        kd = [torch.randn(3, generator=g, dtype=torch.float64) if r[1] else None for r in reach]
        task = [torch.randn(3, generator=g, dtype=torch.float64) if r[0] else None for r in reach]
        for p, gk in zip(params, kd):
            p.grad = None if gk is None else gk.clone()
        opt.stash_distillation_grads()
        for p, gt in zip(params, task):
            p.grad = None if gt is None else gt.clone()
        opt.step()
        as_list = [None if t is None else t.tolist() for t in task], [None if k is None else k.tolist() for k in kd]
        ref_dot_step(ref[:3], as_list[0][:3], as_list[1][:3], ref_state[:3], 0.1 / (step + 1), 5e-4, 0.825, 0.975)
        ref_dot_step(ref[3:], as_list[0][3:], as_list[1][3:], ref_state[3:], 0.2 / (step + 1), 0.0, 0.825, 0.975)
        for p, want in zip(params, ref):
            assert p.detach().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_with_the_task_gradient_alone_dot_is_momentum_sgd_at_the_mean_momentum():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    dot = DistillationOrientedSGD(
        [{"params": [a], "weight_decay": 1e-3}], lr=0.05, momentum_task=0.8, momentum_distill=1.0 - 1e-9
    )
    sgd = torch.optim.SGD([b], lr=0.05, momentum=(0.8 + 1.0 - 1e-9) / 2, weight_decay=1e-3)
    for _ in range(5):
        grad = torch.randn(5, generator=g, dtype=torch.float64)
        a.grad, b.grad = grad.clone(), grad.clone()
        dot.step(), sgd.step()
    assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_both_buffers_are_saved_and_restored():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = DistillationOrientedSGD(
        [{"params": [p], "weight_decay": 0.0}], lr=0.1, momentum_task=0.8, momentum_distill=0.95
    )
    for grad in (torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])):
        p.grad = grad.double()
        opt.stash_distillation_grads()
        p.grad = -grad.double()
        opt.step()
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"momentum_buffer", "distill_momentum_buffer"}
    q = p.detach().clone().requires_grad_()
    again = DistillationOrientedSGD(
        [{"params": [q], "weight_decay": 0.0}], lr=0.1, momentum_task=0.8, momentum_distill=0.95
    )
    again.load_state_dict(copy.deepcopy(saved))  # as from a checkpoint file: no tensor shared with `opt`
    for o, t in ((opt, p), (again, q)):
        t.grad = torch.tensor([3.0, 1.0], dtype=torch.float64)
        o.stash_distillation_grads()
        t.grad = torch.tensor([-1.0, 0.25], dtype=torch.float64)
        o.step()
    assert torch.equal(p, q)


def test_the_trainer_back_propagates_the_two_parts_apart(monkeypatch):
    """The stash holds the distillation terms' gradient and the task buffer sees the cross-entropy's alone."""
    from kdlab import train

    w = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    terms = {"ce": (w**2).sum(), "kd": (3 * w).sum(), "at": w.prod()}
    opt = DistillationOrientedSGD(
        [{"params": [w], "weight_decay": 0.0}], lr=1.0, momentum_task=0.5, momentum_distill=0.6
    )
    seen = {}
    real_step = opt.step

    def step():
        seen["kd"] = opt._distill_grads[id(w)].clone()
        seen["task"] = w.grad.clone()
        real_step()

    monkeypatch.setattr(opt, "step", step)
    train._dot_backward(opt, terms)
    x = [0.3, -0.7]
    assert seen["task"].tolist() == pytest.approx([2 * x[0], 2 * x[1]])
    assert seen["kd"].tolist() == pytest.approx([3 + x[1], 3 + x[0]])


@pytest.mark.parametrize(
    "train, message",
    [
        ({"optimizer": "dot", "nesterov": True}, "Nesterov"),
        ({"optimizer": "dot", "grad_clip": 5.0}, "grad_clip"),
        ({"optimizer": "dot", "fast": {"graph_step": True}}, "two backward passes"),
        ({"optimizer": "dot", "dot_delta": 0.2}, "dot_delta"),
        ({"optimizer": "adam"}, "optimizer"),
    ],
)
def test_what_dot_cannot_do_is_refused(train, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**train)


def test_dot_is_refused_under_torchrun_before_training(monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "digits" / "kd_dot.yaml")
    methods.check_recipe(recipe)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(Exception, match="torchrun"):
        methods.check_recipe(recipe)


def test_teachers_train_with_plain_sgd_and_the_table_counts_two_backward_passes():
    recipe = load_recipe(ROOT / "recipes" / "digits" / "kd_dot.yaml")
    assert teacher_train_config(recipe, recipe.teachers[0]).optimizer == "sgd"
    config = recipe.model_dump(mode="json")
    assert passes_per_step(config)["student_backward"] == 2
    config["train"]["optimizer"] = "sgd"
    assert passes_per_step(config)["student_backward"] == 1


def test_train_on_digits_from_the_command_line(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / "kd_dot.yaml")
    ok(
        capsys,
        [
            "train",
            recipe,
            "--out",
            str(tmp_path / "run"),
            "--quiet",
            *sets("train.epochs=1", "train.max_steps_per_epoch=3"),
        ],
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_kd"] > 0
    refused(capsys, ["train", recipe, "--out", str(tmp_path / "bad"), *sets("train.nesterov=true")], "Nesterov")
