"""State dicts of the reference implementations, read into kdlab's zoo models.

The published CIFAR-100 teachers of RepDistiller (``scripts/fetch_pretrained_teachers.sh``: wrn_40_2,
resnet56, resnet110, resnet32x4, vgg13, ResNet50) and mdistiller's release of the same files are
``torch.save``'d dicts whose ``model`` entry is the state dict (``checkpoint.load_weights`` unwraps it);
the teacher-free KD code saves ``{"state_dict": ...}``, with keys prefixed ``module.`` when the net was
wrapped in ``nn.DataParallel``.  Most zoo modules use the reference's own names; where they differ, the
rules below rename the reference's keys to kdlab's:

* RepDistiller ``vgg*``: ``block{b}.{i}`` is the i-th entry of an ``nn.Sequential`` of conv, BN, ReLU
  triples (the last ReLU dropped), so index 3k is ``block{b}.conv{k+1}`` and 3k+1 ``block{b}.bn{k+1}``;
  ``classifier`` is ``fc``.
* RepDistiller ``wrn_*``: ``block{g}.layer.{j}`` is ``group{g}.{j}``, ``convShortcut`` is ``shortcut``,
  the top-level ``bn1`` is ``bn``.
* ``resnet18`` / ``resnet50`` (RepDistiller's resnetv2, the teacher-free KD code's ResNet, both kuangliu's):
  ``shortcut`` is ``downsample``, ``linear`` is ``fc``.
* RepDistiller ``ShuffleV1``: ``linear`` is ``fc``.  ``ShuffleV2``: the stem ``conv1``/``bn1`` is
  ``stem.conv1``/``stem.bn1``, a down-sampling unit's ``conv1, bn1, conv2, bn2`` are ``left.*`` and its
  ``conv3..bn5`` are ``right.conv1..right.bn3``, a basic unit's convs are ``right.*``, ``conv2``/``bn2``
  are ``conv_last.conv1``/``conv_last.bn1`` and ``linear`` is ``fc``.

The CIFAR ResNets (``resnet8`` .. ``resnet110``, ``resnet8x4``, ``resnet32x4``) need no renaming, nor do
torchvision's ImageNet ResNet-18/34/50 state dicts (``resnet{18,34,50}_imagenet``) and mdistiller's ImageNet
MobileNetV1 (``mobilenetv1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from kdlab.errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _vgg(key: str) -> str:
    m = re.match(r"^block(\d+)\.(\d+)\.(.+)$", key)
    if m:
        k, r = divmod(int(m.group(2)), 3)
        if r in (0, 1):  # r == 2 is a ReLU, which has no parameters
            return f"block{m.group(1)}.{'conv' if r == 0 else 'bn'}{k + 1}.{m.group(3)}"
    return re.sub(r"^classifier\.", "fc.", key)


def _wrn(key: str) -> str:
    key = re.sub(r"^block(\d+)\.layer\.(\d+)\.convShortcut\.", r"group\1.\2.shortcut.", key)
    key = re.sub(r"^block(\d+)\.layer\.(\d+)\.", r"group\1.\2.", key)
    return re.sub(r"^bn1\.", "bn.", key)


def _kuangliu_resnet(key: str) -> str:
    key = re.sub(r"\.shortcut\.", ".downsample.", key)
    return re.sub(r"^linear\.", "fc.", key)


def _shufflev1(key: str) -> str:
    return re.sub(r"^linear\.", "fc.", key)


_DOWN_RIGHT = {"conv3": "conv1", "bn3": "bn1", "conv4": "conv2", "bn4": "bn2", "conv5": "conv3", "bn5": "bn3"}


def _shufflev2(key: str) -> str:
    m = re.match(r"^layer(\d+)\.(\d+)\.(conv\d|bn\d)\.(.+)$", key)
    if m:
        layer, unit, name, rest = m.groups()
        if unit != "0":
            return f"layer{layer}.{unit}.right.{name}.{rest}"
        if name in ("conv1", "bn1", "conv2", "bn2"):
            return f"layer{layer}.0.left.{name}.{rest}"
        return f"layer{layer}.0.right.{_DOWN_RIGHT.get(name, name)}.{rest}"
    for ref, ours in (
        ("conv1.", "stem.conv1."),
        ("bn1.", "stem.bn1."),
        ("conv2.", "conv_last.conv1."),
        ("bn2.", "conv_last.bn1."),
        ("linear.", "fc."),
    ):
        if key.startswith(ref):
            return ours + key[len(ref) :]
    return key


def rule_for(model: nn.Module) -> Callable[[str], str] | None:
    """The renaming of the reference implementation of `model`'s architecture, or None when it has the same names."""
    from kdlab.models.resnet import ResNet
    from kdlab.models.shufflenet import ShuffleNetV1, ShuffleNetV2
    from kdlab.models.vgg import VGG
    from kdlab.models.wrn import WideResNet

    if isinstance(model, VGG):
        return _vgg
    if isinstance(model, WideResNet):
        return _wrn
    # resnet18 / resnet50; the CIFAR ResNets share RepDistiller's names
    if isinstance(model, ResNet) and model.num_stages == 4:
        return _kuangliu_resnet
    if isinstance(model, ShuffleNetV1):
        return _shufflev1
    if isinstance(model, ShuffleNetV2):
        return _shufflev2
    return None


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the `module.` (nn.DataParallel / DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    return set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)


def adapt(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`state` with kdlab's key names for `model`: wrapper prefixes removed, a reference implementation's names
    renamed, BatchNorm step counters that the file lacks (PyTorch < 0.4.1) taken from the model (they only
    count steps).  A state that still does not fit raises a one-line CheckpointError naming its first key
    that does not fit (or the first of the model's keys the file lacks)."""
    own = model.state_dict()
    state = strip_wrappers(state)
    rule = rule_for(model)
    file_names = {k: k for k in state}  # kdlab's name -> the file's name, for the error message
    if rule and not _fits(own, state):  # a kdlab file already fits: rename only what does not
        file_names = {rule(k): k for k in state}
        state = {rule(k): v for k, v in state.items()}
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key].clone()
    if _fits(own, state):
        return state
    name = type(model).__name__
    for key, value in state.items():
        file_key = file_names.get(key, key)
        shown = repr(file_key) if file_key == key else f"{file_key!r} (read as {key!r})"
        if key not in own:
            raise CheckpointError(
                f"{source}: key {shown} does not fit {name}: it has no such parameter or buffer "
                f"(a checkpoint of another architecture?)"
            )
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{source}: key {shown} does not fit {name}: shape {tuple(value.shape)} in the file, "
                f"{tuple(own[key].shape)} in the model"
            )
    missing = next(k for k in own if k not in state)
    raise CheckpointError(
        f"{source}: the file has no {missing!r}, which {name} needs (a checkpoint of a smaller architecture?)"
    )
