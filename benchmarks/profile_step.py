"""Where a KD step's time goes: torch.profiler over the same KD step in NCHW with an unfolded teacher
(the reference's layout) and in kdlab's default layout (channels_last, teacher BN folded).

    python benchmarks/profile_step.py [--teacher resnet56] [--student resnet20] [--steps 8] [--json FILE]
    python benchmarks/profile_step.py --methods crd dkd [--n-data 50000]

`--methods`: instead, one kdlab Distiller step (forward, backward, SGD) per named loss term with its default
options (CE 1 beside it; crd: nce_k 16384, mode exact, a memory bank over `--n-data` CIFAR-100-like labels), in
kdlab's default layout, side by side.

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


def profile_terms(term: str, student0, teacher0, x, y, steps: int, n_data: int) -> dict:
    import time

    from kdlab.config import LossConfig
    from kdlab.distiller import Distiller

    student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
    d = Distiller(student, [teacher], LossConfig(ce=1.0, terms={term: {}}))
    d.build(x[:8], y[:8])
    d.attach_training_set(torch.arange(n_data) % 100)  # 100 classes of n_data / 100 samples, as CIFAR-100
    d.to(memory_format=torch.channels_last)
    fold_batchnorm(teacher, x[:2])
    x = x.contiguous(memory_format=torch.channels_last)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
    gen = torch.Generator().manual_seed(0)

    def step():
        indices = torch.randint(0, n_data, (len(y),), generator=gen)
        loss, _, _ = d(x, y, progress=100.0, indices=indices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "layout": f"{term} step",
        "wall_seconds_per_step": round(wall, 4),
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
    ap.add_argument("--methods", nargs="+", metavar="TERM", help="profile kdlab Distiller steps of these terms")
    ap.add_argument("--n-data", type=int, default=50000, help="--methods: training-set size (CRD's memory bank)")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = models.create(args.teacher, 100).eval().requires_grad_(False)
    student = models.create(args.student, 100)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 100, (args.batch_size,))
    if args.methods:
        layouts = [profile_terms(t, student, teacher, x, y, args.steps, args.n_data) for t in args.methods]
    else:
        layouts = [
            profile_layout(n, student, teacher, x, y, args.steps) for n in ("NCHW, teacher unfolded", "kdlab default")
        ]
    for lay in layouts:
        per_step = f" ({lay['wall_seconds_per_step']:.4f} s wall per step)" if "wall_seconds_per_step" in lay else ""
        print(
            f"\n{lay['layout']}: {lay['self_cpu_seconds_total']:.3f} s self CPU time for {args.steps} steps{per_step}"
        )
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
