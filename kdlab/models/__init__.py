"""The model zoo: CIFAR networks of the KD literature and small nets for the digits data.

``create(name, num_classes=100, in_chans=3, **options)`` builds a model whose ``forward``
returns logits.  Every model also carries:

* ``feature_info``: one dict per stage, shallow to deep, with ``name``, ``module`` (the
  dotted name, as in ``named_modules()``, of the module whose output is the stage's map),
  ``preact_module`` (the module whose output is that map before its final ReLU, or None;
  for the pre-activation WRNs, the BN that follows the stage: RepDistiller's ``preact``
  feature), ``channels`` and ``reduction`` (32 / map size for a 32x32 input);
* ``embedding_module``: the module whose output is the (N, D) vector fed to the classifier;
* ``classifier_module``: the final ``nn.Linear`` (built without a bias by the option
  ``classifier_bias=False`` of every model, `create`);
* ``pool_module``: the global average pooling before it (``avgpool``), whose input is the map a class
  activation map is computed from (the layer alias ``pre_pool``, `kdlab.taps`).

What a stage is.  Where the architecture's reference implementation returns a feature list
(RepDistiller's ``forward(x, is_feat=True)``: ``[stem, f1, ..., fK, pooled]`` for the CIFAR
ResNets, WRNs, VGGs, ResNet18/50, MobileNetV2 (``mobilenetv2_half``) and ShuffleNets), the
stages are exactly its ``f1 .. fK``, i.e. ``feat[1:-1]``, the maps its AT and NST losses sum
over; the stem (``feat[0]``: the first conv(-BN-ReLU), or VGG's block 0) is never a stage.  So
a term's default layers match the reference: ``all`` is ``feat[1:-1]``, ``middle`` (the
second stage) is ``feat[2]``, FitNet's default hint layer, and ``last`` is ``feat[-2]``, where
FT's paraphraser sits.  Nets without such a list (the teacher-free KD nets, the ImageNet
ResNets, the digits nets) have one stage per resolution group, deepest map last.

No zoo model computes anything in place, so tensors captured by forward hooks stay valid.
"""

# importing the zoo modules registers their models
from . import imagenet_resnet, mobilenetv1, mobilenetv2, resnet, shufflenet, small, tfkd_nets, vgg, wrn
from .registry import REGISTRY, create, names, register

__all__ = ["REGISTRY", "create", "names", "register"]
