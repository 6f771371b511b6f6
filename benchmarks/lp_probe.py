"""Why the locality-preserving (LP) loss stalls a CIFAR-100 student on raw embeddings, and which setting trains.

    python benchmarks/lp_probe.py --data-root /tmp/cifar-100-python --teacher RUN_OR_WEIGHTS [--steps 400]

Trains a resnet8 student for a few hundred steps (batch 64, lr 0.05, wd 5e-4, crop + flip) next to a
trained resnet20 teacher, once per arm: CE alone, and CE + LP (gamma 1.5, k 5, sigma^2 from the batch)
on raw or L2-normalised features, at the embedding (kdlab's default) or at FitNet's hint layer (the LP
paper's placement). Every `--every` steps it records the batch CE, the unweighted LP value, the mean
L2 norm of the student's embedding and the fraction of embedding units that are zero for the whole
batch (dead ReLUs); at the end the test top-1 on the full test set. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from kdlab import models
from kdlab.config import LossConfig
from kdlab.data import DeviceLoader, default_augment, load_dataset
from kdlab.distiller import Distiller
from kdlab.teachers import load_model_weights
from kdlab.train import evaluate

ARMS = {
    "vanilla (CE only)": None,
    "lp raw embedding": {"weight": 1.5, "k": 5},
    "lp normalised embedding": {"weight": 1.5, "k": 5, "normalize": True},
    "lp raw hint layer": {"weight": 1.5, "k": 5, "placement": "hint"},
    "lp normalised hint layer": {"weight": 1.5, "k": 5, "placement": "hint", "normalize": True},
}


def probe_arm(lp: dict | None, teacher: torch.nn.Module, train, test, steps: int, every: int, seed: int) -> dict:
    torch.manual_seed(seed)
    student = models.create("resnet8", num_classes=100)
    terms = {"lp": lp} if lp else {}
    distiller = Distiller(student, [teacher] if lp else [], LossConfig(ce=1.0, terms=terms))
    embedding = {}
    modules = dict(student.named_modules())
    modules[student.embedding_module].register_forward_hook(
        lambda m, i, o: embedding.__setitem__("e", o.detach().flatten(1))
    )
    loader = DeviceLoader(train, 64, train=True, augment=default_augment("cifar100"), seed=seed)
    x0, y0 = next(iter(loader))
    distiller.build(x0[:8], y0[:8])
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    trace, step, epoch = [], 0, 0
    distiller.train()
    while step < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            loss, logits, values = distiller(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0 or step == 1:
                e = embedding["e"]
                trace.append(
                    {
                        "step": step,
                        "ce": float(values["ce"]),
                        "lp": float(values["lp"]) if "lp" in values else None,
                        "embedding_norm": float(e.norm(dim=1).mean()),
                        "dead_units": float((e.abs().amax(0) == 0).float().mean()),
                        "batch_top1": float((logits.argmax(1) == y).float().mean() * 100),
                    }
                )
            if step >= steps:
                break
        epoch += 1
    test_top1 = evaluate(student, DeviceLoader(test, 256, train=False))["top1"]
    return {"trace": trace, "test_top1": test_top1}


def load_teacher(teacher: torch.nn.Module, path: Path) -> None:
    """A finished run, its student.safetensors, or a training checkpoint of a run still going (its student part)."""
    from kdlab import checkpoint

    if path.suffix == ".safetensors" and path.parent.name == "checkpoints":
        tensors, _ = checkpoint.load(path)
        prefix = "model.student."
        checkpoint.load_state_into(
            teacher, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, str(path)
        )
    else:
        load_model_weights(teacher, path, "teacher")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument(
        "--teacher",
        required=True,
        help="a finished resnet20 run folder, its student.safetensors, or a "
        "checkpoints/last.safetensors of a teacher still training",
    )
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    train = load_dataset("cifar100", args.data_root, split="train")
    test = load_dataset("cifar100", args.data_root, split="test")
    teacher = models.create("resnet20", num_classes=100)
    load_teacher(teacher, Path(args.teacher))
    teacher.eval().requires_grad_(False)
    teacher_top1 = evaluate(teacher, DeviceLoader(test, 256, train=False))["top1"]
    print(f"teacher resnet20 test top-1 {teacher_top1:.2f}")
    rows = {}
    for name in args.arms:
        t0 = time.time()
        rows[name] = probe_arm(ARMS[name], teacher, train, test, args.steps, args.every, args.seed)
        rows[name]["seconds"] = round(time.time() - t0, 1)
        last = rows[name]["trace"][-1]
        lp_text = last["lp"] if last["lp"] is not None else "-"
        print(
            f"{name:<26} test top-1 {rows[name]['test_top1']:6.2f}  CE {last['ce']:.3f}  LP {lp_text}"
            f"  |emb| {last['embedding_norm']:.3f}  dead {last['dead_units']:.2f}  ({rows[name]['seconds']:.0f} s)",
            flush=True,
        )
    print()
    print(
        f"| arm | test top-1 after {args.steps} steps | "
        + " | ".join(f"step {r['step']}: CE / LP / |emb| / dead" for r in next(iter(rows.values()))["trace"][::2])
        + " |"
    )
    for name, row in rows.items():
        cells = [
            f"{r['ce']:.2f} / {r['lp'] if r['lp'] is None else format(r['lp'], '.4f')} / "
            f"{r['embedding_norm']:.2f} / {r['dead_units']:.2f}"
            for r in row["trace"][::2]
        ]
        print(f"| {name} | {row['test_top1']:.2f} | " + " | ".join(cells) + " |")
    record = {
        "command": "python benchmarks/lp_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("arms", "out")),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "teacher_top1": teacher_top1,
        "steps": args.steps,
        "arms": rows,
    }
    out = Path(args.out) / f"lp_probe-{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
