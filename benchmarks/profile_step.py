"""Where a KD step's time goes: torch.profiler over the same KD step in NCHW with an unfolded teacher
(the reference's layout) and in kdlab's default layout (channels_last, teacher BN folded).

    python benchmarks/profile_step.py [--teacher resnet56] [--student resnet20] [--steps 8] [--json FILE]

Prints the operators with the most self CPU time per layout and writes JSON (default:
benchmarks/results/profile_step-<date>.json). Only the model maths is profiled: no data loading.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch.profiler import ProfilerActivity, profile

from kdlab import models
from kdlab.fast.fold import fold_batchnorm

TOP = 8


def kd_step(student, teacher, opt, x, y):
    with torch.no_grad():
        teacher_logits = teacher(x)
    logits = student(x)
    kd = nnf.kl_div(nnf.log_softmax(logits / 4, 1), nnf.softmax(teacher_logits / 4, 1), reduction="batchmean") * 16
    loss = 0.1 * nnf.cross_entropy(logits, y) + 0.9 * kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def profile_layout(name: str, student0, teacher0, x, y, steps: int) -> dict:
    student, teacher = copy.deepcopy(student0).train(), copy.deepcopy(teacher0)
    if name == "kdlab default":
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        fold_batchnorm(teacher, x[:2])
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
    for _ in range(3):  # oneDNN picks and caches its kernels on the first calls
        kd_step(student, teacher, opt, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            kd_step(student, teacher, opt, x, y)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "layout": name,
        "self_cpu_seconds_total": round(sum(e.self_cpu_time_total for e in events) / 1e6, 3),
        "top_ops": [
            {"op": e.key, "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
            for e in events[:TOP]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = models.create(args.teacher, 100).eval().requires_grad_(False)
    student = models.create(args.student, 100)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 100, (args.batch_size,))
    layouts = [
        profile_layout(n, student, teacher, x, y, args.steps) for n in ("NCHW, teacher unfolded", "kdlab default")
    ]
    for lay in layouts:
        print(f"\n{lay['layout']}: {lay['self_cpu_seconds_total']:.3f} s self CPU time for {args.steps} KD steps")
        for op in lay["top_ops"]:
            print(f"  {op['op']:<36} {op['self_cpu_seconds']:8.3f} s  {op['calls']:6d} calls")
    report = {
        "benchmark": "profile_step",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{torch.get_num_threads()} threads, {platform.machine()}",
        "torch": torch.__version__,
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "layouts": layouts,
    }
    out = Path(
        args.json_out or Path(__file__).resolve().parent / "results" / f"profile_step-{datetime.date.today()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
