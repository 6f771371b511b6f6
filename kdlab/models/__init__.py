"""The model zoo: CIFAR networks of the KD literature and small nets for the digits data.

``create(name, num_classes=100, in_chans=3, **options)`` builds a model whose ``forward``
returns logits.  Every model also carries:

* ``feature_info``: one dict per stage, shallow to deep, with ``name``, ``module`` (the
  dotted name, as in ``named_modules()``, of the module whose output is the stage's
  post-activation map), ``preact_module`` (the module whose output is that map before its
  final ReLU, or None), ``channels`` and ``reduction`` (32 / map size for a 32x32 input);
* ``embedding_module``: the module whose output is the (N, D) vector fed to the classifier;
* ``classifier_module``: the final ``nn.Linear``.

No zoo model computes anything in place, so tensors captured by forward hooks stay valid.
"""

from .registry import REGISTRY, create, names, register

# importing the zoo modules registers their models
from . import imagenet_resnet, mobilenetv2, resnet, shufflenet, small, tfkd_nets, vgg, wrn  # noqa: E402,F401

__all__ = ["REGISTRY", "create", "names", "register"]
