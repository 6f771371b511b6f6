"""Model zoo: registry, exact parameter counts, hook taps, no in-place ops, small inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab import models
from kdlab.errors import ConfigError

# sum of p.numel() for num_classes=100, in_chans=3, from the reference implementations
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "resnet50": 23_705_252,
    "mobilenetv2_half": 812_836,
    "shufflev1": 949_258,
    "shufflev2": 1_355_528,
    "resnet18": 11_220_132,
    "mobilenetv2": 2_369_380,
    "shufflenetv2": 1_360_896,
    "googlenet": 6_258_500,
    "densenet121": 7_048_548,
    "resnext29_8x64d": 34_518_948,
    # torchvision's 11,689,512 and 21,797,672 at 1000 classes, less 900 * 513 for the smaller fc
    "resnet18_imagenet": 11_227_812,
    "resnet34_imagenet": 21_335_972,
    # torchvision's 25,557,032 at 1000 classes, less 900 * 2049
    "resnet50_imagenet": 23_712_932,
    # 4,231,976 at 1000 classes (tests/test_imagenet_models.py counts it naively), less 900 * 1025
    "mobilenetv1": 3_309_476,
}
# digits nets: (min, max) parameters for 1x8x8 inputs and 10 classes
SMALL_RANGES = {"smallcnn": (10_000, 30_000), "smallcnn_wide": (100_000, 200_000), "smallcnn_narrow": (4_370, 4_370)}
BIG = {"resnext29_8x64d", "resnet50", "densenet121", "googlenet"}  # batch 1 to stay fast

ALL = models.names()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_cover_exactly_the_zoo():
    assert ALL == sorted(ALL)
    assert set(ALL) == set(PARAM_COUNTS) | set(SMALL_RANGES)


@pytest.mark.parametrize("name", ALL)
def test_param_count(name):
    torch.manual_seed(0)
    if name in SMALL_RANGES:
        lo, hi = SMALL_RANGES[name]
        model = models.create(name, num_classes=10, in_chans=1)
        assert lo <= n_params(model) <= hi
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    else:
        assert n_params(models.create(name, num_classes=100)) == PARAM_COUNTS[name]


def _hook_all(model: nn.Module):
    """Keep (reference, clone) of every module output, keyed by module name."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for mod_name, module in model.named_modules():

        def hook(_m, _inp, out, mod_name=mod_name):
            if isinstance(out, torch.Tensor):
                seen.setdefault(mod_name, []).append((out, out.detach().clone()))

        handles.append(module.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_and_taps(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=100)
    model.train()
    n = 1 if name in BIG else 2
    x = torch.randn(n, 3, 32, 32)
    seen, handles = _hook_all(model)
    logits = model(x)
    assert logits.shape == (n, 100)
    logits.square().mean().backward()
    for h in handles:
        h.remove()
    assert all(p.grad is not None for p in model.parameters())

    modules = dict(model.named_modules())
    # no module output was modified after its hook ran (no in-place ops anywhere)
    for mod_name, outs in seen.items():
        for ref, snapshot in outs:
            assert torch.equal(ref, snapshot), f"{name}: output of {mod_name!r} changed in place"
    assert not any(getattr(m, "inplace", False) for m in modules.values())

    info = model.feature_info
    assert info, name
    assert [s["name"] for s in info] == [f"stage{i}" for i in range(1, len(info) + 1)]
    prev_reduction = 1
    for s in info:
        assert set(s) == {"name", "module", "preact_module", "channels", "reduction"}
        assert s["reduction"] >= prev_reduction
        prev_reduction = s["reduction"]
        size = 32 // s["reduction"]
        expected = (n, s["channels"], size, size)
        ((post, _),) = seen[s["module"]]  # each tapped module runs exactly once
        assert post.shape == expected, (name, s)
        if s["preact_module"] is not None:
            ((pre, _),) = seen[s["preact_module"]]
            assert pre.shape == expected, (name, s)
            if name.startswith("wrn"):
                # pre-activation net: the stage is the raw group output and `pre` the BN that follows it
                bn = modules[s["preact_module"]]
                assert isinstance(bn, nn.BatchNorm2d) and s["module"].startswith("group"), (name, s)
            else:
                # the stage output is the ReLU of the pre-activation
                assert torch.equal(F.relu(pre), post), (name, s)
            assert (pre < 0).any(), (name, s)

    fc = modules[model.classifier_module]
    assert isinstance(fc, nn.Linear) and fc.out_features == 100
    ((emb, _),) = seen[model.embedding_module]
    assert emb.shape == (n, fc.in_features)
    torch.testing.assert_close(fc(emb), logits)


# RepDistiller's `forward(x, is_feat=True)` feature list without its stem and pooled vector, i.e. the
# maps its AT/NST losses take (`feat[1:-1]`), as (C, H, W) for a 32x32 input (models/*.py there)
REFERENCE_STAGES = {
    "resnet56": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "resnet8x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "resnet32x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "wrn_40_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "vgg8": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "vgg13": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "resnet18": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "resnet50": [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
    "mobilenetv2_half": [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    "shufflev1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "shufflev2": [(116, 16, 16), (232, 8, 8), (464, 4, 4)],
}


@pytest.mark.parametrize("name", sorted(REFERENCE_STAGES))
def test_stages_are_the_reference_feature_list(name):
    """`all` = feat[1:-1], `middle` = feat[2] (FitNet's default hint layer), `last` = feat[-2] (FT)."""
    from kdlab.taps import FeatureTaps, default_layers

    torch.manual_seed(0)
    model = models.create(name, num_classes=100).eval()
    layers = default_layers(model, "all", "model")
    taps = FeatureTaps(model, layers)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    shapes = [tuple(taps[spec].shape[1:]) for spec in layers]
    assert shapes == REFERENCE_STAGES[name]
    assert default_layers(model, "middle", "model") == [layers[1]]  # feat[2]: the second entry of feat[1:-1]
    assert default_layers(model, "last", "model") == [layers[-1]]
    assert default_layers(model, "penultimate", "model") == [layers[-2]]  # USKD's weak head


def test_vgg_block0_is_the_stem_and_wrn_stages_are_raw_group_outputs():
    vgg = models.create("vgg13")
    assert [s["module"] for s in vgg.feature_info] == ["block1", "block2", "block3", "block4"]
    wrn = models.create("wrn_16_2")
    assert [s["module"] for s in wrn.feature_info] == ["group1", "group2", "group3"]


# PyTorch's default init draws every conv weight from U(-b, b) with b = 1/sqrt(fan_in) (kaiming_uniform
# with a = sqrt(5)); a Kaiming-normal fan_out init exceeds that bound somewhere in any of these nets
DEFAULT_INIT = [
    "mobilenetv2",
    "shufflenetv2",
    "googlenet",
    "densenet121",
    "resnet18",
    "resnet50",
    "shufflev1",
    "shufflev2",
    "mobilenetv1",
]
KAIMING_INIT = ["resnet18_imagenet", "resnext29_8x64d", "resnet20", "vgg8", "wrn_16_2", "mobilenetv2_half"]


def _within_default_bound(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            if m.weight.abs().max() > 1 / fan_in**0.5 + 1e-7:
                return False
    return True


@pytest.mark.parametrize("name", DEFAULT_INIT + KAIMING_INIT)
def test_init_is_the_reference_init(name):
    """Teacher-free KD's nets (pytorch-cifar100, kuangliu) and RepDistiller's ShuffleNets have no init code:
    PyTorch's default; RepDistiller's ResNets/VGG/WRN/MobileNetV2 and ResNeXt init Kaiming-normal fan_out."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=100)
    assert _within_default_bound(model) == (name in DEFAULT_INIT)
    if name in ("resnet18", "resnet50"):  # RepDistiller's resnetv2 init on request
        assert not _within_default_bound(models.create(name, num_classes=100, init="kaiming"))


def test_hooked_output_equals_recomputation_after_backward():
    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10).eval()  # eval: BN is a fixed function
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(key):
        def hook(_m, _inp, out):
            kept[key] = (out, out.detach().clone())

        return hook

    for s in model.feature_info:
        for key in (s["module"], s["preact_module"]):
            model.get_submodule(key).register_forward_hook(keep(key))
    x = torch.randn(4, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()
    assert len(kept) == 6
    for key, (ref, snapshot) in kept.items():
        assert torch.equal(ref, snapshot), key
    # recompute each stage from scratch and compare with the tensors the hooks kept
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        for i, s in enumerate(model.feature_info, start=1):
            layer = model.get_submodule(f"layer{i}")
            h = layer(h)
            assert torch.equal(kept[s["module"]][0], h)
            assert torch.equal(F.relu(kept[s["preact_module"]][0]), h)


@pytest.mark.parametrize("name", ALL)
def test_one_channel_8x8_input(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_chans=1)
    logits = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10)
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(3, 1, 8, 8))).all()


def test_creation_is_deterministic():
    torch.manual_seed(123)
    a = models.create("wrn_16_1")
    torch.manual_seed(123)
    b = models.create("wrn_16_1")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bn = a.get_submodule("group1.0.bn1")
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_unknown_name_suggests_close_match():
    with pytest.raises(ConfigError) as err:
        models.create("resnet_56")
    msg = str(err.value)
    assert "closest match: 'resnet56'" in msg
    assert all(name in msg for name in ALL)  # the valid names are listed
    with pytest.raises(ConfigError, match="closest match: 'shufflev2'"):
        models.create("shuffle_v2")
    with pytest.raises(ConfigError, match="closest match: 'wrn_40_2'"):
        models.create("WRN_40_2")


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        models.create("resnet8", num_classes=0)
    with pytest.raises(ConfigError):
        models.create("resnet8", width=3)
    assert models.create("googlenet", num_classes=5, dropout=0.0).fc.out_features == 5


def test_register_decorator_and_duplicates():
    @models.register("_tmp_test_net")
    def build(num_classes=100, in_chans=3):
        return models.create("smallcnn", num_classes=num_classes, in_chans=in_chans)

    try:
        assert "_tmp_test_net" in models.names()
        assert models.create("_tmp_test_net", num_classes=3, in_chans=1)(torch.randn(2, 1, 8, 8)).shape == (2, 3)
        with pytest.raises(ValueError):
            models.register("_tmp_test_net")(build)
    finally:
        del models.REGISTRY["_tmp_test_net"]
    assert "_tmp_test_net" not in models.names()
