"""kdlab.fast on the CPU: BN folding, the exact teacher-output cache, and the sync-free step against the
plain trainer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_train import RECIPES, student_weights
from torch import nn

from kdlab import models, pipeline
from kdlab.config import LossConfig, TrainConfig
from kdlab.data import AugmentSpec, DeviceLoader, load_dataset
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError
from kdlab.fast.fold import fold_batchnorm, foldable_pairs
from kdlab.fast.teacher_cache import TeacherCache
from kdlab.recipe_files import load_recipe
from kdlab.taps import FeatureTaps, stage_aliases
from kdlab.train import fit

# one model of every zoo family (the two ResNet block types separately)
FAMILIES = [
    "smallcnn",
    "resnet8",
    "resnet50",
    "wrn_16_1",
    "vgg8",
    "mobilenetv2_half",
    "shufflev1",
    "shufflev2",
    "googlenet",
    "densenet121",
    "resnext29_8x64d",
]


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_model_matches_logits_and_tapped_features(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10)
    randomise_bn(model)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    specs = list(stage_aliases(model))
    reference = copy.deepcopy(model)
    ref_taps = FeatureTaps(reference, specs)
    with torch.no_grad():
        ref_logits = reference(x).double()
    ref_feats = ref_taps.take()
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}

    folded = fold_batchnorm(model, x[:2])

    assert folded, "nothing was folded"
    modules = dict(model.named_modules())
    assert set(modules) == set(dict(reference.named_modules())), "module names changed"
    for bn in folded:
        assert bn in bn_names and isinstance(modules[bn], nn.Identity)
    taps = FeatureTaps(model, specs)  # taps by name and alias still resolve and see the same values
    with torch.no_grad():
        logits = model(x).double()
    feats = taps.take()
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 1e-5 * scale
    assert set(feats) == set(ref_feats)
    for spec, ref in ref_feats.items():
        assert (feats[spec].double() - ref.double()).abs().max() <= 1e-5 * ref.abs().max().double() + 1e-6, spec


def test_conv_output_read_twice_is_not_folded():
    # DenseNet concatenates its stem conv's output with the first dense layer's new maps while bn1 also
    # reads it; WRN-16-1's first block adds the stem output to its shortcut: folding would change those reads
    torch.manual_seed(0)
    dense = models.create("densenet121", num_classes=10).eval()
    pairs = dict((bn, conv) for conv, bn in foldable_pairs(dense, torch.zeros(2, 3, 16, 16)))
    assert "dense1.0.bn1" not in pairs
    assert pairs["dense1.0.bn2"] == "dense1.0.conv1"
    wrn = models.create("wrn_16_1", num_classes=10).eval()
    assert not any(conv == "conv1" for conv, _ in foldable_pairs(wrn))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_fold_arithmetic_against_a_float64_reference_and_hooked_modules_are_left_alone():
    torch.manual_seed(0)
    model = ConvBN()
    randomise_bn(model, seed=3)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    conv, bn = model.conv, model.bn
    y = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    expected = (y - bn.running_mean.double()[:, None, None]) / torch.sqrt(
        bn.running_var.double()[:, None, None] + bn.eps
    ) * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    hooked = copy.deepcopy(model)
    seen = []
    hooked.conv.register_forward_hook(lambda m, i, o: seen.append(o))

    assert fold_batchnorm(model, x) == ["bn"]
    with torch.no_grad():
        assert torch.allclose(model(x).double(), expected, rtol=0, atol=1e-5)
    assert fold_batchnorm(hooked, x) == []  # a tap on the conv's own output must keep seeing it
    assert isinstance(hooked.bn, nn.BatchNorm2d)
    with pytest.raises(ConfigError, match="eval"):
        fold_batchnorm(ConvBN().train())


# ------------------------------------------------------------------------------------------ teacher cache


@pytest.fixture(scope="module")
def digits_small():
    train = load_dataset("digits", split="train")
    return train.subset(slice(0, 96))


def small_teacher(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    teacher = models.create("smallcnn_wide", num_classes=10, in_chans=1)
    randomise_bn(teacher, seed)
    return teacher.eval().requires_grad_(False)


def naive_view(image: torch.Tensor, dx: int, dy: int, flip: int, pad: int) -> torch.Tensor:
    """One view by explicit loops: zero padding, the window at row dy / column dx, a mirror."""
    c, h, w = image.shape
    out = torch.zeros(c, h, w, dtype=torch.uint8)
    for ch in range(c):
        for r in range(h):
            for col in range(w):
                src_col = (w - 1 - col if flip else col) + dx - pad
                src_row = r + dy - pad
                if 0 <= src_row < h and 0 <= src_col < w:
                    out[ch, r, col] = image[ch, src_row, src_col]
    return out


def test_cached_logits_equal_the_online_teacher_for_every_drawn_view(digits_small, tmp_path):
    teacher = small_teacher()
    augment = AugmentSpec(crop_pad=1, flip=True)  # 18 views: crops and flips both exercised
    loader = DeviceLoader(digits_small, 32, train=True, augment=augment, seed=5)
    cache = TeacherCache.build([teacher], digits_small, augment, "cpu", 32, torch.float32, "device", tmp_path)
    assert cache.tables[0].logits.shape == (96, 18, 10)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, _y, index, view in loader.iter_batches(with_meta=True):
            with torch.no_grad():
                online = teacher(x)
            assert torch.equal(cache.lookup(index, view)[0], online)  # bit for bit

    # the views the table is indexed by are the ones a hand-written crop/flip produces
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 96, (32,), generator=g)
    view = torch.randint(0, 18, (32,), generator=g)
    side = 2 * 1 + 1
    batch = []
    for i, v in zip(index.tolist(), view.tolist()):
        flip, cell = v % 2, v // 2
        batch.append(naive_view(digits_small.images[i], cell % side, cell // side, flip, 1))
    mean = torch.tensor(digits_small.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits_small.std).view(1, -1, 1, 1)
    x = (torch.stack(batch).double() / 255 - mean) / std
    with torch.no_grad():
        expected = teacher(x.float())
    torch.testing.assert_close(cache.lookup(index, view)[0], expected, rtol=0, atol=1e-5)


def test_cache_is_stored_reused_and_refuses_rotation(digits_small, tmp_path, monkeypatch):
    teacher = small_teacher()
    augment = AugmentSpec(crop_pad=1, flip=False)
    first = TeacherCache.build([teacher], digits_small, augment, "cpu", 32, torch.float32, "disk", tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".logits")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["shape"] == [96, 18, 10]

    import kdlab.fast.teacher_cache as tc

    def fail(*a, **k):
        raise AssertionError("recomputed although a stored table exists")

    monkeypatch.setattr(tc, "build_table", fail)
    again = TeacherCache.build([teacher], digits_small, augment, "cpu", 32, torch.float32, "disk", tmp_path)
    assert torch.equal(again.tables[0].logits, first.tables[0].logits)
    other = small_teacher(seed=2)  # other weights, another key: not served from this table
    with pytest.raises(AssertionError, match="recomputed"):
        TeacherCache.build([other], digits_small, augment, "cpu", 32, torch.float32, "disk", tmp_path)
    with pytest.raises(ConfigError, match="rotation"):
        TeacherCache.build([teacher], digits_small, AugmentSpec(crop_pad=1, rotation=15.0), "cpu", 32)


def test_recipe_refuses_the_cache_where_it_cannot_be_exact():
    with pytest.raises(ConfigError, match="read teacher features"):
        load_recipe(RECIPES / "nst.yaml", ["train.teacher_cache=true"])
    with pytest.raises(ConfigError, match="non-enumerable"):
        load_recipe(RECIPES / "kd.yaml", ["train.teacher_cache=true", "data.augment.rotation=15"])
    with pytest.raises(ConfigError, match="nonfinite=stop"):
        load_recipe(RECIPES / "kd.yaml", ["train.fast.graph_step=true", "train.nonfinite=skip"])


def quick_kd(*extra: str):
    return load_recipe(RECIPES / "kd.yaml", ["train.epochs=2", "train.max_steps_per_epoch=4", *extra])


@pytest.fixture(scope="module")
def plain_kd_run(tmp_path_factory):
    """A short default KD run on digits and its teacher cache directory, shared by the comparisons below."""
    root = tmp_path_factory.mktemp("kd")
    pipeline.run(quick_kd(f"cache_dir={root / 'cache'}"), root / "plain", quiet=True)
    return root / "cache", root / "plain"


def test_cached_kd_run_gives_the_same_weights_as_an_uncached_run(plain_kd_run, tmp_path):
    cache, plain_dir = plain_kd_run
    pipeline.run(quick_kd(f"cache_dir={cache}", "train.teacher_cache=true"), tmp_path / "cached", quiet=True)
    assert list((cache / "logits").glob("*.logits")), "the cached run did not use a table"
    assert "teacher cache: computing" in (tmp_path / "cached" / "log.txt").read_text()
    plain, cached = student_weights(plain_dir), student_weights(tmp_path / "cached")
    assert all(torch.equal(plain[k], cached[k]) for k in plain)


# ------------------------------------------------------------------------------------------ graph step


def build_distiller(digits, loss: LossConfig, teachers: int = 1) -> Distiller:
    torch.manual_seed(0)
    student = models.create("smallcnn", num_classes=10, in_chans=1)
    distiller = Distiller(student, [small_teacher(seed=1 + i) for i in range(teachers)], loss)
    distiller.build(digits.images[:4].float() / 255, digits.labels[:4])
    return distiller


def train_weights(digits, run_dir, cfg: TrainConfig, loss: LossConfig, teachers: int = 1, cache=None) -> dict:
    distiller = build_distiller(digits, loss, teachers)
    loader = DeviceLoader(digits, cfg.batch_size, train=True, augment=AugmentSpec(crop_pad=1), seed=0)
    fit(distiller, loader, None, cfg, run_dir, lambda _m: None, teacher_cache=cache)
    return {k: v.clone() for k, v in distiller.state_dict().items()}


@pytest.mark.parametrize("case", ["kd", "feed_nesterov_clip", "nkd", "wttm", "uskd", "sdd", "cat_kd"])
def test_graph_step_run_eagerly_matches_the_plain_trainer(digits_small, tmp_path, case):
    if case == "kd":
        loss = LossConfig(ce=0.1, terms={"kd": {"weight": 0.9, "T": 4}})
        extra, teachers = {}, 1
    elif case in ("nkd", "wttm", "uskd"):  # logit terms that drop the target column by a gather; USKD's side head
        loss = LossConfig(ce=1.0, terms={case: {}})
        extra, teachers = {}, 0 if case == "uskd" else 1
    elif case in ("sdd", "cat_kd"):  # the classifiers applied to the tapped pre-pool maps; SDD's argmax weights
        loss = LossConfig(ce=1.0, terms={case: {"student_bias": "drop", "weight": 2.0} if case == "cat_kd" else {}})
        extra, teachers = {}, 1
    else:  # side modules (translators), two teachers, nesterov, no decay on BN/bias, clipping
        loss = LossConfig(ce=1.0, terms={"feed": {"weight": 50}})
        extra, teachers = {"nesterov": True, "decay_norm_and_bias": False, "grad_clip": 1.0}, 2
    base = dict(
        epochs=2, batch_size=32, lr=0.1, max_steps_per_epoch=4, schedule={"type": "cosine"}, device="cpu", **extra
    )
    plain = train_weights(digits_small, tmp_path / "plain", TrainConfig(**base), loss, teachers)
    fast = train_weights(
        digits_small, tmp_path / "fast", TrainConfig(**base, fast={"graph_step": True}), loss, teachers
    )
    init = build_distiller(digits_small, loss, teachers).state_dict()
    assert set(plain) == set(fast)
    moved = max((plain[k].float() - init[k].float()).abs().max().item() for k in plain if plain[k].is_floating_point())
    assert moved > 1e-3  # the runs trained
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], rtol=0, atol=1e-6, msg=k)


def test_graph_step_with_the_teacher_cache_matches_the_plain_trainer(digits_small, tmp_path):
    loss = LossConfig(ce=0.1, terms={"kd": {"weight": 0.9, "T": 4}})
    base = dict(epochs=2, batch_size=32, lr=0.1, max_steps_per_epoch=4, device="cpu")
    plain = train_weights(digits_small, tmp_path / "plain", TrainConfig(**base), loss)
    teacher = small_teacher()
    cache = TeacherCache.build([teacher], digits_small, AugmentSpec(crop_pad=1), "cpu", 32)
    fast = train_weights(
        digits_small, tmp_path / "fast", TrainConfig(**base, fast={"graph_step": True}), loss, cache=cache
    )
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], rtol=0, atol=1e-6, msg=k)


def test_default_folded_teacher_trains_close_to_an_unfolded_one(plain_kd_run, tmp_path):
    cache, plain_dir = plain_kd_run  # the default: the teacher's BN folded
    assert "BatchNorm layers folded" in (plain_dir / "log.txt").read_text()
    pipeline.run(quick_kd(f"cache_dir={cache}", "train.fast.fold_teacher=false"), tmp_path / "unfolded", quiet=True)
    assert "BatchNorm layers folded" not in (tmp_path / "unfolded" / "log.txt").read_text()
    folded, unfolded = student_weights(plain_dir), student_weights(tmp_path / "unfolded")
    for k in folded:
        torch.testing.assert_close(unfolded[k], folded[k], rtol=0, atol=1e-4, msg=k)
