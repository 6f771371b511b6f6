"""data.val_split: a stratified validation split held out of the training set, a pure function of the seed;
the epoch selected on it (top1_selected), and teachers with checkpoint: best chosen on it."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import yaml
from helpers import RECIPES, TINY

from kdlab import checkpoint, pipeline
from kdlab.data import load_dataset
from kdlab.data.val_split import stratified_indices
from kdlab.errors import DataError
from kdlab.recipe_files import load_recipe
from kdlab.student import load_data


def naive_quota(counts: list[int], size: int) -> list[int]:
    """Largest remainder, written out: floors, then one more to the largest fractional shares (ties: lower class)."""
    n = sum(counts)
    floors = [size * c // n for c in counts]
    fractions = [(size * c % n, -k) for k, c in enumerate(counts)]
    for _, neg_k in sorted(fractions, reverse=True)[: size - sum(floors)]:
        floors[-neg_k] += 1
    return floors


def test_split_is_stratified_disjoint_and_a_function_of_the_seed():
    labels = load_dataset("digits", split="train").labels
    counts = torch.bincount(labels, minlength=10).tolist()
    train, val = stratified_indices(labels, 203, seed=7, num_classes=10)
    assert len(val) == 203 and len(train) + len(val) == len(labels)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    got = Counter(labels[val].tolist())
    assert [got[k] for k in range(10)] == naive_quota(counts, 203)
    again = stratified_indices(labels, 203, seed=7, num_classes=10)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    other = stratified_indices(labels, 203, seed=8, num_classes=10)[1]
    assert not torch.equal(other, val)


def test_split_refuses_what_cannot_be_held_out():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    with pytest.raises(DataError, match="10 validation images asked of a training set of 10"):
        stratified_indices(labels, 10, 0, 3)
    with pytest.raises(DataError, match="class 2 .* with none to train on"):
        stratified_indices(labels, 8, 0, 3)  # quotas 2.4, 4.8, 0.8 -> 2, 5, 1: class 2 emptied


def test_the_run_holds_out_the_split_and_selects_on_it(tmp_path):
    recipe = load_recipe(RECIPES / "kd.yaml", [*TINY, "data.val_split=150", "teachers.0.checkpoint=best"], seed=3)
    data = load_data(recipe)
    full = load_dataset("digits", split="train")
    assert len(data.val) == 150 and len(data.train) == len(full) - 150
    _, val_idx = stratified_indices(full.labels, 150, 3, 10)  # the run's seed draws the split
    assert torch.equal(data.val.images, full.images[val_idx])
    out = tmp_path / "kd"
    result = pipeline.run(recipe, out, quiet=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["val_split"] == 150
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_top1" in r and "val_top5" in r for r in rows)
    best_val = max(r["val_top1"] for r in rows)
    chosen = [r for r in rows if r["val_top1"] == best_val][-1]  # ties: the later epoch
    assert result["selected_on"] == "val" and result["val_images"] == 150
    assert result["top1_selected"] == chosen["test_top1"] and result["selected_epoch"] == chosen["epoch"]
    # the teacher's best checkpoint: the epoch chosen on its validation split, not on the test set
    teacher = result["teachers"][0]
    t_rows = [json.loads(line) for line in open(f"{teacher['source']}/metrics.jsonl")]
    t_best = max(r["val_top1"] for r in t_rows)
    t_epoch = [r for r in t_rows if r["val_top1"] == t_best][-1]["epoch"]
    _, meta = checkpoint.load(f"{teacher['source']}/checkpoints/best.safetensors")
    assert meta["epoch"] == teacher["best_epoch"] == t_epoch and teacher["selected_on"] == "val"


def test_without_a_split_the_selection_is_the_best_test_epoch_labelled_so(tmp_path):
    result = pipeline.run(load_recipe(RECIPES / "vanilla.yaml", TINY), tmp_path / "v", quiet=True)
    assert result["selected_on"] == "test" and result["top1_selected"] == result["top1_best"]
    assert "val_images" not in result
