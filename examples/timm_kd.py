"""Distil timm models (https://github.com/huggingface/pytorch-image-models) with kdlab's loss terms.

timm is not a kdlab dependency; install it without replacing your torch (docs/api.md, "timm and
torchvision models"). Layers are named by module name, as timm's own `feature_info` lists them
(`act1`, `layer1`...`layer4` for its ResNets), and the terms' default layers come from that
`feature_info` too. Nothing is downloaded (`pretrained=False`), so this runs offline on the
embedded digits data.

The 8x8 digits are enlarged to 32x32 first: a timm ResNet divides the input by 4 before `layer1`
and by 32 at `layer4`, so on 8x8 images `layer2`...`layer4` are 1x1 maps, whose normalised
attention map is 1 for every image and every network, and attention transfer there is exactly 0.
At 32x32, `layer1` and `layer2` are 8x8 and 4x4.

    python examples/timm_kd.py --epochs 5
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from kdlab.api import Distill
from kdlab.data import load_dataset

SIZE = 32


def enlarged(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images at SIZE x SIZE, labels): a pair, which Distill normalises with the training images' statistics."""
    images = F.interpolate(ds.images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8), ds.labels


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    train, test = (enlarged(load_dataset("digits", split=s)) for s in ("train", "test"))
    common = dict(epochs=args.epochs, lr=0.05, test_data=test, device=args.device, max_steps_per_epoch=args.max_steps)

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    print("modules timm reports as features:", [f["module"] for f in teacher.feature_info])
    Distill(teacher).fit(train, **common)
    print(f"resnet18 teacher: test top-1 {Distill(teacher).evaluate(test)['top1']:.2f}%")

    student = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    d = Distill(
        student,
        teacher,
        ce=0.1,
        terms={
            "kd": {"weight": 0.9, "T": 4},
            "at": {"weight": 100, "student_layers": ["layer1", "layer2"], "teacher_layers": ["layer1", "layer2"]},
        },
    )
    history = d.fit(train, **common)
    top1 = history[-1]["test_top1"]
    print(
        f"resnet10t distilled from resnet18: test top-1 {top1:.2f}% (last epoch's weighted AT term "
        f"{history[-1]['train_at']:.4f})"
    )
    return top1


if __name__ == "__main__":
    main()
