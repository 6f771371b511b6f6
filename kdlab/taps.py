"""Features taken by forward hooks on module names, so any nn.Module can be distilled unedited.

A layer spec is either a dotted module name (as in `named_modules()`) or, for models that declare
`feature_info`, an alias: `stage3` (the map of stage 3, as the next layer sees it), `stage3:pre` (its
pre-activation output), `last` / `last:pre` (the deepest stage), `embedding` (the penultimate
vector fed to the classifier) and `pre_pool` (the map the classifier's global pooling reads, see
`pool_module`). A module name with the suffix `:in` (`avgpool:in`) taps that module's input instead of
its output. For the zoo's models a stage is one of the maps the reference implementation returns
between stem and pooled embedding (RepDistiller's `feat[1:-1]`; see `kdlab.models`), so `all`,
`middle` and `last` tap what the reference's losses tap.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from kdlab.errors import LayerError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
INPUT_SUFFIX = ":in"  # `name:in`: the first positional input of module `name` (a forward pre-hook)
POOL_NAMES = ("avgpool", "global_pool")  # torchvision-style and timm-style names of the global pooling module


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers, so names stay the user's names."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def kdlab_feature_info(model: nn.Module) -> list[dict]:
    """The model's feature_info entries in kdlab's form ('name' and 'module').

    timm's models list their feature maps too, as entries with 'module', 'num_chs' and 'reduction' but no
    'name' (a plain list, or a `FeatureInfo` holding it in `.info` for `features_only` models): such a stage
    is named by its module (`layer3`), so the terms' defaults ('all', 'last', 'middle') work on timm models.
    """
    info = getattr(unwrap(model), "feature_info", None) or []
    info = getattr(info, "info", info)
    if not isinstance(info, (list, tuple)):
        return []
    out = []
    for e in info:
        if isinstance(e, dict) and isinstance(e.get("module"), str) and e["module"]:
            out.append(e if "name" in e else {**e, "name": e["module"]})
    return out


def pool_module(model: nn.Module) -> str | None:
    """The name of the module that pools the last feature map globally before the classifier, or None.

    The rule: the model's ``pool_module`` attribute (every kdlab zoo model declares it: its ``avgpool``), else a
    direct child named ``avgpool`` (torchvision's nets) or ``global_pool`` (timm's). Its input is the map that a
    class activation map or a region logit is computed from (`kdlab.losses.class_maps`): for a pre-activation WRN
    that is the map after the final BN and ReLU, for MobileNetV2 and ShuffleNetV2 the output of the last 1x1
    conv, which the deepest stage ('last') is not.
    """
    base = unwrap(model)
    declared = getattr(base, "pool_module", None)
    if isinstance(declared, str) and declared:
        return declared
    children = dict(base.named_children())
    return next((name for name in POOL_NAMES if name in children), None)


def stage_aliases(model: nn.Module) -> dict[str, str]:
    info = kdlab_feature_info(model)
    aliases: dict[str, str] = {}
    for entry in info:
        if entry["name"] != entry["module"]:  # a timm stage is its module's own name
            aliases[entry["name"]] = entry["module"]
        if entry.get("preact_module"):
            aliases[entry["name"] + ":pre"] = entry["preact_module"]
    if info:
        aliases["last"] = info[-1]["module"]
        if info[-1].get("preact_module"):
            aliases["last:pre"] = info[-1]["preact_module"]
    emb = getattr(unwrap(model), "embedding_module", None)
    if emb:
        aliases["embedding"] = emb
    pool = pool_module(model)
    if pool:
        aliases["pre_pool"] = pool + INPUT_SUFFIX
    return aliases


def resolve(model: nn.Module, spec: str, role: str = "model") -> str:
    """The module name a layer spec points to; a wrong spec fails here, listing what exists."""
    base = unwrap(model)
    aliases = stage_aliases(base)
    name = aliases.get(spec, spec)
    suffix = INPUT_SUFFIX if name.endswith(INPUT_SUFFIX) else ""
    name = name[: len(name) - len(suffix)]
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix) and name not in dict(base.named_modules()):
            name = name[len(prefix) :]
    modules = dict(base.named_modules())
    if name in modules and name != "":
        return name + suffix
    valid = list(aliases) + [n for n in modules if n]
    close = difflib.get_close_matches(spec, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    shown = ", ".join(list(aliases) + [n for n in modules if n][:40])
    more = " ..." if len(modules) > 41 else ""
    raise LayerError(f"{role} has no layer {spec!r}{hint} Valid: {shown}{more}")


def stage_names(model: nn.Module) -> list[str]:
    return [e["name"] for e in kdlab_feature_info(model)]


def default_layers(model: nn.Module, which: str, role: str) -> list[str]:
    """Defaults per method: 'all' stages (RepDistiller's feat[1:-1]), the 'last' stage (feat[-2]), 'middle'
    (the second stage, feat[2]: RepDistiller's default FitNet hint layer), 'penultimate' (the stage before the
    last), 'embedding', 'pre_pool' (the input of the global pooling, `pool_module`); a ':pre' suffix
    ('all:pre') names the same stages' pre-activation outputs."""
    if which.endswith(":pre"):  # the same stages before their final ReLU (AB, OFD)
        return [spec + ":pre" for spec in default_layers(model, which[: -len(":pre")], role)]
    stages = stage_names(model)
    if which == "embedding":
        if not getattr(unwrap(model), "embedding_module", None):
            raise LayerError(
                f"{role} declares no embedding_module; "
                "name the layer explicitly (e.g. the flatten before the classifier)"
            )
        return ["embedding"]
    if which == "pre_pool":  # the map the global pooling reads (class maps, region logits)
        if not pool_module(model):
            raise LayerError(
                f"{role} ({type(unwrap(model)).__name__}) has no global pooling module kdlab can find (a "
                f"'pool_module' attribute, or a child named {' or '.join(POOL_NAMES)}); name the map in the term's "
                "layer options: a module name, or 'NAME:in' for the input of module NAME"
            )
        return ["pre_pool"]
    if not stages:
        raise LayerError(
            f"{role} ({type(unwrap(model)).__name__}) has no feature_info; "
            "name the tapped layers explicitly in the loss term's options"
        )
    if which == "all":
        return stages
    if which == "last":
        return [stages[-1]]
    if which == "middle":
        return [stages[min(1, len(stages) - 1)]]
    if which == "penultimate":  # the stage before the deepest one (USKD's weak head)
        return [stages[max(len(stages) - 2, 0)]]
    raise ValueError(which)


class FeatureTaps:
    """Forward hooks that keep the latest output of each named module."""

    def __init__(self, model: nn.Module, specs: list[str], role: str = "model"):
        base = unwrap(model)
        self.names = {spec: resolve(base, spec, role) for spec in dict.fromkeys(specs)}
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(base.named_modules())
        self._handles = []
        for spec, name in self.names.items():
            if name.endswith(INPUT_SUFFIX):
                module = modules[name[: -len(INPUT_SUFFIX)]]
                self._handles.append(module.register_forward_pre_hook(self._input_keeper(spec)))
            else:
                self._handles.append(modules[name].register_forward_hook(self._keeper(spec)))

    def _keeper(self, spec: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {self.names[spec]!r} returns {type(output).__name__}, not a tensor; tap another layer"
                )
            self.outputs[spec] = output

        return hook

    def _input_keeper(self, spec: str):
        def hook(_module, inputs):
            first = inputs[0] if inputs else None
            if not isinstance(first, torch.Tensor):
                raise LayerError(f"layer {self.names[spec]!r}: the module's first input is not a tensor; tap another")
            self.outputs[spec] = first

        return hook

    def __getitem__(self, spec: str) -> torch.Tensor:
        return self.outputs[spec]

    def take(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
