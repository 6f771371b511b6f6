"""The classifier applied to a feature map (kdlab.losses.class_maps), the `pre_pool` tap it reads and the
`classifier_bias` model option, against float64 loops written from the definitions: a class map is the
classifier's matmul at each pixel, a region logit the classifier on the region's mean (the official SDD `SPP`,
shicaiwei123/SDD-CVPR2024 mdistiller/models/cifar/utils.py: a 4x4 adaptive grid first, coarser levels from it)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab import models, taps
from kdlab.errors import ConfigError, LayerError
from kdlab.losses.class_maps import class_maps, classifier, find_classifier, region_logits, spp_regions


def windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows: [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def ref_pool(grid: list[list[float]], out: int) -> list[list[float]]:
    h, w = len(grid), len(grid[0])
    res = []
    for a, b in windows(h, out):
        row = []
        for c, d in windows(w, out):
            cells = [grid[i][j] for i in range(a, b) for j in range(c, d)]
            row.append(sum(cells) / len(cells))
        res.append(row)
    return res


def ref_regions(fmap: torch.Tensor, levels) -> list[list[list[float]]]:
    """[n][c][r]: each channel pooled to 4x4, then each level from that grid, coarse to fine, row-major."""
    n_, c_ = fmap.shape[:2]
    out = []
    for n in range(n_):
        chans = []
        for c in range(c_):
            grid = ref_pool(fmap[n, c].tolist(), 4)
            chans.append([v for k in levels for row in ref_pool(grid, k) for v in row])
        out.append(chans)
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_class_maps_are_the_classifier_at_every_pixel(bias):
    g = torch.Generator().manual_seed(0)
    fc = nn.Linear(5, 3).double()
    fmap = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    got = class_maps(fc, fmap, bias=bias)
    assert got.shape == (2, 3, 3, 4)
    w, b = fc.weight.tolist(), fc.bias.tolist()
    for n in range(2):
        for k in range(3):
            for i in range(3):
                for j in range(4):
                    ref = sum(w[k][c] * fmap[n, c, i, j].item() for c in range(5)) + (b[k] if bias else 0.0)
                    assert got[n, k, i, j].item() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("size, levels", [(8, (1, 2, 4)), (6, (1, 2, 4)), (2, (1, 2)), (5, (1,))])
def test_spp_regions_pool_a_4x4_grid_first_then_each_level_from_it(size, levels):
    fmap = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    got = spp_regions(fmap, levels)
    ref = torch.tensor(ref_regions(fmap, levels), dtype=torch.float64)
    assert got.shape == (2, 3, sum(k * k for k in levels))
    assert torch.allclose(got, ref, atol=1e-12)
    # region 0 is the global mean exactly when 4 divides the map (the official grid-first rule otherwise)
    if size % 4 == 0 or size < 4:
        assert torch.allclose(got[:, :, 0], fmap.mean((2, 3)), atol=1e-12)


def test_region_logits_are_the_classifier_on_each_region_mean():
    fc = nn.Linear(3, 4).double()
    fmap = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = region_logits(fc, fmap, (1, 2, 4))
    regions = ref_regions(fmap, (1, 2, 4))
    w, b = fc.weight.tolist(), fc.bias.tolist()
    for n in range(2):
        for k in range(4):
            for r in range(21):
                ref = sum(w[k][c] * regions[n][c][r] for c in range(3)) + b[k]
                assert got[n, k, r].item() == pytest.approx(ref, abs=1e-12)


# the zoo models whose deepest stage is not the map the pooling reads (WRN: BN + ReLU after it; MobileNetV2,
# ShuffleNetV2: a last 1x1 conv) and some whose stage is
@pytest.mark.parametrize("name", ["wrn_16_2", "mobilenetv2", "shufflev2", "resnet8x4", "vgg8", "shufflev1"])
def test_pre_pool_is_the_map_whose_class_maps_average_to_the_logits(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10).eval()
    t = taps.FeatureTaps(model, ["pre_pool", "last"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = t.take()
        maps = class_maps(model, feats["pre_pool"])
    assert torch.allclose(maps.mean((2, 3)), logits, atol=1e-4)
    assert torch.allclose(region_logits(model, feats["pre_pool"])[:, :, 0], logits, atol=1e-4)
    if name in ("wrn_16_2", "mobilenetv2", "shufflev2"):
        last = feats["last"]
        assert last.shape != feats["pre_pool"].shape or not torch.allclose(last, feats["pre_pool"])


def test_classifier_bias_false_builds_a_cam_network():
    torch.manual_seed(0)
    with_bias = models.create("resnet8", num_classes=10)
    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10, classifier_bias=False).eval()
    assert model.fc.bias is None and torch.equal(model.fc.weight, with_bias.fc.weight)
    assert sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in model.parameters()) == 10
    t = taps.FeatureTaps(model, ["pre_pool"])
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
        assert torch.allclose(class_maps(model, t.take()["pre_pool"]).mean((2, 3)), logits, atol=1e-5)
    with pytest.raises(ConfigError, match="classifier_bias"):
        models.create("resnet8", num_classes=10, classifier_bias="no")


class Timmish(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(1), nn.Linear(4, 3))

    def get_classifier(self):
        return self.head[1]

    def forward(self, x):
        return self.head(self.global_pool(self.body(x)))


class Plain(nn.Module):
    def __init__(self, head: str = "classifier"):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 1)
        self.add_module(head, nn.Linear(4, 3) if head != "proj" else nn.Conv2d(4, 3, 1))

    def forward(self, x):
        return self.body(x)


def test_the_classifier_rule_and_its_errors():
    assert find_classifier(models.create("smallcnn", num_classes=10, in_chans=1)) == "fc"
    assert find_classifier(Timmish()) == "head.1"
    assert find_classifier(Plain("classifier")) == "classifier"
    assert find_classifier(Plain("linear")) == "linear"
    plain = Plain()
    assert classifier(plain, "classifier") is plain.classifier
    with pytest.raises(LayerError, match="loss.terms.sdd.student_classifier"):
        find_classifier(Plain("proj"), role="student", option="loss.terms.sdd.student_classifier")
    with pytest.raises(LayerError, match="is a Conv2d, not an nn.Linear; set the term's option cls"):
        find_classifier(Plain("proj"), "proj", option="cls")
    with pytest.raises(LayerError, match="no such module"):
        find_classifier(Plain(), "fc9")
    with pytest.raises(LayerError, match="channels but the classifier reads"):
        class_maps(nn.Linear(4, 3), torch.zeros(1, 5, 2, 2))
    with pytest.raises(LayerError, match=r"\(N, C, H, W\)"):
        class_maps(nn.Linear(4, 3), torch.zeros(1, 4))


def test_pre_pool_and_module_input_taps():
    model = Timmish()
    assert taps.resolve(model, "pre_pool") == "global_pool:in"
    assert taps.resolve(model, "head:in") == "head:in"
    t = taps.FeatureTaps(model, ["pre_pool", "head:in", "body"])
    model(torch.randn(2, 1, 3, 3))
    out = t.take()
    assert out["pre_pool"] is out["body"] and out["head:in"].shape == (2, 4, 1, 1)
    with pytest.raises(LayerError, match="has no global pooling module.*NAME:in"):
        taps.default_layers(Plain(), "pre_pool", "student")
    with pytest.raises(LayerError, match="nope:in"):
        taps.resolve(model, "nope:in")
