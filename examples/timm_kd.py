"""Distil timm models (https://github.com/huggingface/pytorch-image-models) with kdlab's loss terms.

timm is not a kdlab dependency: `pip install timm` first. Layers are named by module name, as
timm's own `feature_info` lists them (`layer1`...`layer4` for its ResNets); nothing is downloaded
(`pretrained=False`), so this runs offline on the embedded digits data.

    python examples/timm_kd.py --epochs 5
"""

from __future__ import annotations

import argparse

import timm
import torch

from kdlab.api import Distill
from kdlab.data import load_dataset


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    common = dict(epochs=args.epochs, lr=0.05, test_data=test, device=args.device, max_steps_per_epoch=args.max_steps)

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    print("modules timm reports as features:", [f["module"] for f in teacher.feature_info])
    Distill(teacher).fit(train, **common)

    student = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    d = Distill(student, teacher, ce=0.1, terms={
        "kd": {"weight": 0.9, "T": 4},
        "at": {"weight": 100, "student_layers": ["layer3", "layer4"], "teacher_layers": ["layer3", "layer4"]},
    })
    top1 = d.fit(train, **common)[-1]["test_top1"]
    print(f"resnet10t distilled from resnet18: test top-1 {top1:.2f}%")
    return top1


if __name__ == "__main__":
    main()
