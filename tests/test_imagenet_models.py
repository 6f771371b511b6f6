"""ImageNet zoo: torchvision ResNet state dicts load as teachers, published parameter counts, MobileNetV1.

torchvision is not imported: its key names and shapes are written out here from its documented ResNet
(torchvision/models/resnet.py: conv1/bn1 stem, layer{i}.{j} blocks with conv{k}/bn{k}, downsample.0/1 on
the first block of a stage whose stride or width changes, fc), and MobileNetV1's from mdistiller's
mdistiller/models/imagenet/mobilenetv1.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab import models
from kdlab.teachers import load_model_weights


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def torchvision_resnet_keys(depths: list[int], bottleneck: bool, classes: int = 1000) -> dict[str, tuple]:
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    expansion = 4 if bottleneck else 1
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for j in range(n):
            stride = 2 if (i > 1 and j == 0) else 1
            p = f"layer{i}.{j}"
            if bottleneck:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                keys.update(_bn(f"{p}.bn3", planes * 4))
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
            if stride != 1 or inplanes != planes * expansion:
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * expansion))
            inplanes = planes * expansion
    keys["fc.weight"] = (classes, inplanes)
    keys["fc.bias"] = (classes,)
    return keys


TORCHVISION = {
    "resnet18_imagenet": (([2, 2, 2, 2], False), 11_689_512),
    "resnet34_imagenet": (([3, 4, 6, 3], False), 21_797_672),
    "resnet50_imagenet": (([3, 4, 6, 3], True), 25_557_032),
}


def _n_params(keys: dict[str, tuple]) -> int:
    total = 0
    for k, shape in keys.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_published_counts_and_torchvision_keys(name):
    (depths, bottleneck), published = TORCHVISION[name]
    keys = torchvision_resnet_keys(depths, bottleneck)
    assert _n_params(keys) == published  # the naive key list is torchvision's net
    model = models.create(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == published
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys


def _random_state(keys: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7 + len(state), dtype=torch.long)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.1
    return state


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_pth_loads_as_teacher_weights(name, tmp_path):
    """A torch.save'd torchvision state dict goes through the teacher `weights:` path (weights_only=True)."""
    (depths, bottleneck), _ = TORCHVISION[name]
    state = _random_state(torchvision_resnet_keys(depths, bottleneck), seed=1)
    path = tmp_path / f"{name}-torchvision.pth"
    torch.save(state, path)
    model = models.create(name, num_classes=1000)
    load_model_weights(model, path, "teacher 0")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def _bn_eval(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"], False)


def _naive_resnet18(x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """torchvision's BasicBlock ResNet-18 forward in eval mode, from the state dict's tensors alone."""
    x = F.relu(_bn_eval(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), s, "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for i in range(1, 5):
        for j in range(2):
            p = f"layer{i}.{j}"
            stride = 2 if (i > 1 and j == 0) else 1
            out = F.relu(_bn_eval(F.conv2d(x, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
            out = _bn_eval(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in s:
                x = _bn_eval(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
            x = F.relu(out + x)
    return F.linear(x.mean((2, 3)), s["fc.weight"], s["fc.bias"])


def test_loaded_resnet18_computes_torchvision_forward(tmp_path):
    state = {
        k: v.double() if v.is_floating_point() else v
        for k, v in _random_state(torchvision_resnet_keys([2, 2, 2, 2], False), seed=2).items()
    }
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = models.create("resnet18_imagenet", num_classes=1000).double().eval()
    load_model_weights(model, path, "teacher 0")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _naive_resnet18(x, state), rtol=1e-9, atol=1e-9)


# mdistiller's MobileNetV1: conv_bn(3, 32, 2), then conv_dw(inp, oup, stride) blocks, AvgPool2d(7), fc 1024 -> 1000
MDISTILLER_MOBILENETV1 = [
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
]


def mdistiller_mobilenetv1_keys(classes: int = 1000) -> dict[str, tuple]:
    keys = {"model.0.0.weight": (32, 3, 3, 3), **_bn("model.0.1", 32)}
    for i, (inp, oup, _stride) in enumerate(MDISTILLER_MOBILENETV1, start=1):
        keys[f"model.{i}.0.weight"] = (inp, 1, 3, 3)  # depthwise: groups=inp
        keys.update(_bn(f"model.{i}.1", inp))
        keys[f"model.{i}.3.weight"] = (oup, inp, 1, 1)
        keys.update(_bn(f"model.{i}.4", oup))
    keys["fc.weight"] = (classes, 1024)
    keys["fc.bias"] = (classes,)
    return keys


def test_mobilenetv1_is_mdistillers_net():
    keys = mdistiller_mobilenetv1_keys()
    assert _n_params(keys) == 4_231_976
    model = models.create("mobilenetv1", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    # mdistiller's get_stage_channels and the blocks its feat1..feat4 end in; each stage halves the resolution
    info = model.feature_info
    assert [s["channels"] for s in info] == [128, 256, 512, 1024]
    assert [s["module"] for s in info] == ["model.3", "model.5", "model.11", "model.13"]
    assert [s["preact_module"] for s in info] == ["model.3.4", "model.5.4", "model.11.4", "model.13.4"]
    assert [s["reduction"] for s in info] == [4, 8, 16, 32]
    strides = [2] + [st for _i, _o, st in MDISTILLER_MOBILENETV1]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.stride[0] for c in convs] == strides


def test_mobilenetv1_mdistiller_checkpoint_loads(tmp_path):
    state = _random_state(mdistiller_mobilenetv1_keys(), seed=4)
    path = tmp_path / "mv1.pth"
    torch.save({"model": state, "epoch": 100}, path)  # mdistiller's checkpoint layout
    model = models.create("mobilenetv1", num_classes=1000)
    load_model_weights(model, path, "teacher 0")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_resnet50_imagenet_stages_for_feature_terms():
    from kdlab.taps import FeatureTaps, default_layers

    model = models.create("resnet50_imagenet", num_classes=10).eval()
    layers = default_layers(model, "all", "model")
    taps = FeatureTaps(model, layers)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert [tuple(taps[s].shape[1:]) for s in layers] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]


def test_wrong_torchvision_file_is_a_one_line_error(tmp_path):
    from kdlab.errors import CheckpointError

    path = tmp_path / "resnet50.pth"
    torch.save(_random_state(torchvision_resnet_keys([3, 4, 6, 3], True), seed=5), path)
    model = models.create("resnet34_imagenet", num_classes=1000)
    with pytest.raises(CheckpointError, match=r"teacher 0 .*resnet50\.pth: key 'layer1\.0\.conv1\.weight'") as err:
        load_model_weights(model, path, "teacher 0")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("term", ["at", "nst", "feed", "reviewkd", "dkd"])
def test_feature_terms_run_on_resnet50_to_mobilenetv1(term):
    """The ImageNet pair's stage taps drive the feature terms (64 px: stage maps 16/8/4/2)."""
    from kdlab.config import LossConfig
    from kdlab.distiller import Distiller

    torch.manual_seed(0)
    student = models.create("mobilenetv1", num_classes=10)
    teacher = models.create("resnet50_imagenet", num_classes=10).eval()
    distiller = Distiller(student, [teacher], LossConfig(terms={term: {}}))
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    distiller.build(x, y)
    total, logits, values = distiller(x, y, progress=1.0)
    assert logits.shape == (4, 10) and torch.isfinite(values[term]) and values[term] > 0
    total.backward()
    assert student.model[1][3].weight.grad.abs().sum() > 0
