"""The model's own classifier applied to a feature map: class activation maps and SPP region logits.

Every kdlab classifier ends with global average pooling and a Linear, ``z = W mean_hw(F) + b``. The same Linear
read as a 1x1 convolution (``W`` as K x C x 1 x 1) turns the map before the pooling into one map per class,
``A_k(h, w) = W_k . F(:, h, w) (+ b_k)``, the class activation map (CAM) that CAT-KD transfers (Guo et al., CVPR 2023;
official code `GzyAftermath/CAT-KD`, the ``conv_test`` of the ``*_test`` models). Averaging the map over a region
first and then applying the Linear gives the region's logits, which is what SDD distils (Wei, Luo, Luo, CVPR 2024;
official code `shicaiwei123/SDD-CVPR2024`, ``SPP`` in `mdistiller/models/cifar/utils.py` and the ``*_sdd``
models): by linearity that is the CAM averaged over the region. Both go through :func:`class_maps`.

Which module is the classifier (:func:`find_classifier`), in order: the module a term names in its options
(``student_classifier`` / ``teacher_classifier``); the model's ``classifier_module`` attribute (every kdlab zoo
model declares it); timm's ``get_classifier()`` when it returns an ``nn.Linear``; a direct child ``nn.Linear``
named ``fc``, ``classifier``, ``linear`` or ``head``. The map comes from the layer alias ``pre_pool`` of
`kdlab.taps` (the input of the global pooling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab import taps
from kdlab.errors import ConfigError, LayerError

CHILD_NAMES = ("fc", "classifier", "linear", "head")
SPP_GRID = 4
"""The official SPP pools the map to 4x4 first and each coarser level from that grid, not from the map."""
SPP_LEVELS = (1, 2, 4)


def find_classifier(model: nn.Module, name: str | None = None, role: str = "model", option: str = "classifier") -> str:
    """The dotted name of ``model``'s final ``nn.Linear``, found by the rule in the module docstring.

    ``option``: the term option that sets ``name``, quoted by the error when no classifier is found.
    """
    base = taps.unwrap(model)
    modules = dict(base.named_modules())
    if name is None:
        declared = getattr(base, "classifier_module", None)
        if isinstance(declared, str) and declared in modules:
            name = declared
        elif callable(getattr(base, "get_classifier", None)):
            found = base.get_classifier()
            name = next((n for n, m in modules.items() if m is found and n), None)
        if name is None:
            children = dict(base.named_children())
            name = next((n for n in CHILD_NAMES if isinstance(children.get(n), nn.Linear)), None)
    if name is None:
        raise LayerError(
            f"{role} ({type(base).__name__}): no classifier found (no classifier_module attribute, no "
            f"get_classifier(), no Linear child named {', '.join(CHILD_NAMES)}); set the term's option {option} "
            "to the name of its final nn.Linear"
        )
    if name not in modules or not isinstance(modules[name], nn.Linear):
        what = "no such module" if name not in modules else f"a {type(modules[name]).__name__}"
        raise LayerError(
            f"{role}: classifier {name!r} is {what}, not an nn.Linear; set the term's option {option} to the name "
            "of its final nn.Linear"
        )
    return name


def classifier(model: nn.Module, name: str | None = None, role: str = "model", option: str = "classifier") -> nn.Linear:
    """``model``'s final ``nn.Linear`` (:func:`find_classifier`)."""
    return taps.unwrap(model).get_submodule(find_classifier(model, name, role, option))


def class_maps(model: nn.Module, feature_map: Tensor, bias: bool = True) -> Tensor:
    r"""The classifier applied at every position of ``feature_map``: (N, C, H, W) -> (N, K, H, W).

    .. math:: A_{nk}(h, w) = \sum_c W_{kc} F_{nc}(h, w) + [\text{bias}]\, b_k

    ``model``: the classifier itself (an ``nn.Linear``) or a model whose classifier :func:`find_classifier`
    finds. ``bias=False`` leaves ``b`` out (CAT-KD's CAM network); a classifier without a bias has none to add.
    Average-pooling the result over all positions gives the model's logits when ``F`` is the map its global
    pooling reads.
    """
    fc = model if isinstance(model, nn.Linear) else classifier(model)
    if not isinstance(feature_map, Tensor) or feature_map.dim() != 4:
        shape = tuple(feature_map.shape) if isinstance(feature_map, Tensor) else type(feature_map).__name__
        raise LayerError(f"class_maps: expected a feature map (N, C, H, W), got {shape}")
    if feature_map.shape[1] != fc.in_features:
        raise LayerError(
            f"class_maps: the map has {feature_map.shape[1]} channels but the classifier reads {fc.in_features} "
            f"(map {tuple(feature_map.shape)}); tap the map its global pooling reads (layer 'pre_pool')"
        )
    weight = fc.weight.to(feature_map.dtype)
    maps = torch.einsum("nchw,kc->nkhw", feature_map, weight)
    if bias and fc.bias is not None:
        maps = maps + fc.bias.to(maps.dtype)[None, :, None, None]
    return maps


def check_levels(name: str, levels) -> tuple[int, ...]:
    """SPP levels: strictly increasing grid sizes from (1, 2, 4), starting with 1 (the global region)."""
    levels = tuple(levels) if isinstance(levels, (list, tuple)) else levels
    if (
        not isinstance(levels, tuple)
        or not levels
        or any(isinstance(v, bool) or v not in SPP_LEVELS for v in levels)
        or list(levels) != sorted(set(levels))
        or levels[0] != 1
    ):
        raise ConfigError(
            f"{name}: levels must be increasing grid sizes from {list(SPP_LEVELS)} starting with 1 (the global "
            f"region), e.g. [1, 2] or [1, 2, 4]; got {levels!r}"
        )
    return levels


def spp_regions(feature_map: Tensor, levels=(1, 2, 4)) -> Tensor:
    """The map averaged over every region of each level: (N, C, H, W) -> (N, C, R), R = sum of level^2.

    As the official ``SPP``: the map is adaptive-average-pooled to a 4x4 grid, each level is that grid pooled to
    level x level, and the levels are concatenated coarse to fine, each region row-major; region 0 is the global
    one. On a map whose sides 4 divides, every region is the plain mean over its part of the map.
    """
    levels = check_levels("spp_regions", levels)
    if not isinstance(feature_map, Tensor) or feature_map.dim() != 4:
        raise LayerError(f"spp_regions: expected a feature map (N, C, H, W), got {getattr(feature_map, 'shape', None)}")
    grid = nn.functional.adaptive_avg_pool2d(feature_map, SPP_GRID)
    return torch.cat([nn.functional.adaptive_avg_pool2d(grid, k).flatten(2) for k in levels], dim=2)


def region_logits(model: nn.Module, feature_map: Tensor, levels=(1, 2, 4), bias: bool = True) -> Tensor:
    """SDD's region logits, (N, K, R): the classifier applied to each SPP region of ``feature_map``
    (:func:`spp_regions`), through :func:`class_maps` on the (N, C, R, 1) map of regions."""
    return class_maps(model, spp_regions(feature_map, levels).unsqueeze(-1), bias).squeeze(-1)
