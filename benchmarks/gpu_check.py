"""One call that checks and measures kdlab's CUDA paths, sized for a scarce GPU (under 8 minutes on one GPU).

    python benchmarks/gpu_check.py --data /tmp/cifar-100-python            # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --dry-run --out /tmp/g.json  # tiny sizes, for CI

Sections (each one is timed and reported; a failing one is recorded and the others still run):

``graph_vs_eager``   resnet56 -> resnet20 KD steps (batch 64, live teacher), run eagerly and as a
                     captured CUDA graph from the same weights on the same batches, in fp32 (TF32 off)
                     and bf16; the eager steps and the replays run under
                     ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises; a capture
                     refuses syncs by itself); weights compared after every run.
``bf16_vs_fp32``     from those runs: the first step's loss and logits and the weight update, bf16
                     against fp32.
``fast_recipe``      per fast recipe (recipes/cifar100/fast/): the teacher cache built the way a run
                     builds it (BN folded, bf16, in device memory) on a subset of the training images
                     (build time, size, both extrapolated to the whole set), its lookups against the
                     live teacher on training batches, then ``fit`` with the recipe's train section on
                     that subset for a few epochs; the time of one full 240-epoch run is extrapolated
                     from the measured epochs (plus the cache build and one evaluation per epoch).
``bench``            ``kdlab bench`` (kdlab.tools.bench.run_bench) for resnet56:resnet20 and
                     resnet32x4:resnet8x4, KD, modes reference / kdlab / kdlab-fast, with
                     max_memory_allocated and max_memory_reserved.
``stream_imagenet``  the streaming ImageNet loader (data.loader: stream) at 224 px: 1,536 synthetic JPEGs
                     of ImageNet's typical size (about 480x360) generated in a temporary folder here, then
                     benchmarks/stream_loader.py's two measurements: decode + RandomResizedCrop + flip
                     images/s per worker count, and a ResNet-18 (resnet18_imagenet) SGD step fed by the
                     loader against the same step on a resident batch.
``torchrun_nccl``    a 2-process torchrun job (NCCL, global-batch BatchNorm, the eager graph step)
                     when 2 GPUs exist; skipped with a note otherwise.

The data are CIFAR-100 when ``--data`` (or /tmp/cifar-100-python) holds it, synthetic CIFAR-shaped
images otherwise; the models are freshly initialised (speed and agreement do not need trained
weights). Writes one JSON file and prints a table. Installs nothing. ``--dry-run`` runs every section
at tiny sizes with tiny models; on the CPU the captured graph is :class:`kdlab.fast.graph_step.RerunGraphs`
(same capture/replay code, the replay re-runs the step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdlab import __version__, compute, models, optim, train
from kdlab.config import LossConfig, TrainConfig
from kdlab.data import DeviceLoader, default_augment, load_dataset
from kdlab.distiller import Distiller
from kdlab.fast.graph_step import GraphStep, RerunGraphs
from kdlab.recipe_files import load_recipe
from kdlab.tools import bench

ROOT = Path(__file__).resolve().parents[1]
FAST_RECIPES = ["resnet56_resnet20_kd_b512.yaml", "resnet32x4_resnet8x4_kd_b512.yaml"]
DEFAULT_DATA = "/tmp/cifar-100-python"
KD = LossConfig(ce=0.1, terms={"kd": {"weight": 0.9, "T": 4.0}})
CIFAR100_TRAIN = 50_000


@dataclass
class Sizes:
    steps: int = 30  # graph_vs_eager: steps per run
    batch: int = 64  # graph_vs_eager: the published batch
    pair: tuple = ("resnet56", "resnet20")
    cache_images: int = 5120  # fast_recipe: the subset the cache and the epochs run on
    fast_epochs: int = 4  # fast_recipe: epochs measured (the first includes warm-up and capture)
    hit_batches: int = 4  # fast_recipe: training batches whose lookups are compared with the live teacher
    fast_batch: int | None = None  # None: the recipe's own (512)
    models: dict | None = None  # dry run: every model replaced by a tiny one
    bench_pairs: str = "resnet56:resnet20,resnet32x4:resnet8x4"
    bench_batch: int = 64
    bench_steps: int = 30
    bench_warmup: int = 10  # > the graph step's 3 warm-up calls + capture, so no capture is timed
    bench_workers: int | None = None
    test_images: int | None = None  # None: the whole test set
    stream_images: int = 1536  # stream_imagenet: synthetic JPEGs generated
    stream_size: int = 224
    stream_batch: int = 48  # 32 batches: 13 warm-up (6 workers x prefetch 2 + 1), 19 timed
    stream_workers: tuple = (0, 4, 8)  # decode + augment alone
    stream_step_workers: int = 6
    stream_model: str = "resnet18_imagenet"
    stream_side: tuple = ((420, 540), (315, 405))  # width, height ranges


DRY = Sizes(
    steps=6,
    batch=8,
    pair=("resnet8", "resnet8"),
    cache_images=32,
    fast_epochs=2,
    hit_batches=2,
    fast_batch=8,
    models={"resnet56": "resnet8", "resnet20": "resnet8", "resnet32x4": "resnet8", "resnet8x4": "resnet8"},
    bench_pairs="resnet8:resnet8",
    bench_batch=8,
    bench_steps=2,
    bench_warmup=1,
    bench_workers=0,
    test_images=64,
    stream_images=24,
    stream_size=32,
    stream_batch=4,
    stream_workers=(0, 1),
    stream_step_workers=1,
    stream_model="resnet8",
    stream_side=((40, 56), (36, 48)),
)


# ------------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Any operation that makes the host wait for the GPU raises inside (CUDA only; nothing to check on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over every floating tensor, relative to that tensor's largest |a|."""
    worst = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            scale = v.double().abs().max().item() or 1.0
            worst = max(worst, (v.double() - b[k].double()).abs().max().item() / scale)
    return worst


def weights(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def load_data(args, sizes: Sizes, device: torch.device):
    """(train, test, note): CIFAR-100 from --data or /tmp/cifar-100-python when there, synthetic otherwise."""
    root = None if args.synthetic else args.data or (DEFAULT_DATA if Path(DEFAULT_DATA).exists() else None)
    if root is not None:
        train_set, test_set = (
            load_dataset("cifar100", root, split="train"),
            load_dataset("cifar100", root, split="test"),
        )
        note = f"CIFAR-100 from {root}"
    else:
        n = sizes.cache_images if args.dry_run else CIFAR100_TRAIN
        train_set, test_set = (
            bench.synthetic_dataset(n, seed=0),
            bench.synthetic_dataset(sizes.test_images or 10_000, seed=1),
        )
        note = "synthetic CIFAR-shaped images (no CIFAR-100 found)"
    if sizes.test_images is not None:
        test_set = test_set.subset(slice(0, sizes.test_images))
    return train_set, test_set, note


def model(name: str, sizes: Sizes, num_classes: int = 100) -> torch.nn.Module:
    return models.create((sizes.models or {}).get(name, name), num_classes=num_classes)


# ------------------------------------------------------------------------------------------ sections


def graph_vs_eager(device: torch.device, sizes: Sizes, train_set, ctx: dict) -> dict:
    teacher_name, student_name = sizes.pair
    torch.manual_seed(0)
    base_student, base_teacher = model(student_name, sizes), model(teacher_name, sizes).eval().requires_grad_(False)
    loader = DeviceLoader(
        train_set, sizes.batch, train=True, augment=default_augment("cifar100"), device=device, seed=0
    )
    data = []
    for epoch in range(sizes.steps // max(len(loader), 1) + 1):  # fixed batches, drawn before any sync check
        loader.set_epoch(epoch)
        data += list(itertools.islice(iter(loader), sizes.steps - len(data)))
    runs, out = {}, {}
    for amp in ("off", "bf16"):
        cfg = TrainConfig(batch_size=sizes.batch, amp=amp, device=device.type)
        for mode in ("eager", "captured"):
            student, teacher = copy.deepcopy(base_student), copy.deepcopy(base_teacher)
            distiller = Distiller(student, [teacher], KD).to(device)
            distiller.build(data[0][0][:8], data[0][1][:8])
            channels_last = compute.use_channels_last(cfg, device)
            if channels_last:
                distiller.to(memory_format=torch.channels_last)
            opt = optim.make_optimizer(distiller, cfg, device)
            capture = mode == "captured"
            graphs = RerunGraphs([distiller]) if capture and device.type != "cuda" else None
            step = GraphStep(
                lambda x, y, tl, d=distiller: d(x, y, teacher_logits=tl),
                opt,
                device,
                compute.autocast_factory(cfg, device, cache_enabled=False),
                None,
                None,
                capture=capture,
                graphs=graphs,
            )
            first = None
            with compute.cuda_numerics(cfg, device):
                for i, (x, y) in enumerate(data):
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    # steady state: the first call sets up cuBLAS/cuDNN; the eager steps are the warm-up
                    # path too, and a capture refuses syncs by itself, so the replays are what is left
                    checked = i > (step.warmup if capture else 0)
                    with no_host_sync(device) if checked else contextlib.nullcontext():
                        result = step(x, y, 0.05)
                    if i == 0:
                        first = (result[0].float().clone(), result[1].float().clone(), weights(distiller))
                sync(device)
            runs[(amp, mode)] = {"first": first, "last": weights(distiller)}
            if capture:
                out[f"{amp}_eager_calls_after_capture"] = step.eager_calls
        diff = max_rel_diff(runs[(amp, "eager")]["last"], runs[(amp, "captured")]["last"])
        out[f"{amp}_captured_vs_eager_max_rel_diff"] = diff
        # the same kernels in the same order: only non-deterministic reductions may differ
        out[f"{amp}_pass"] = diff <= (1e-3 if amp == "off" else 1e-2)
    ctx["graph_runs"], ctx["init_student"] = runs, weights(base_student)
    out.update(
        steps=len(data),
        batch=sizes.batch,
        pair=f"{teacher_name}:{student_name}",
        sync_debug_mode="error" if device.type == "cuda" else "n/a on cpu",
        graph="torch.cuda.CUDAGraph" if device.type == "cuda" else "RerunGraphs (CPU stand-in)",
    )
    if not (out["off_pass"] and out["bf16_pass"]):
        raise CheckFailed(
            f"captured and eager weights differ: fp32 {out['off_captured_vs_eager_max_rel_diff']:.2e}, "
            f"bf16 {out['bf16_captured_vs_eager_max_rel_diff']:.2e}",
            out,
        )
    return out


def bf16_vs_fp32(device: torch.device, sizes: Sizes, ctx: dict) -> dict:
    runs = ctx.get("graph_runs")
    if not runs:
        raise Skipped("needs graph_vs_eager")
    (l32, z32, w32), (l16, z16, w16) = runs[("off", "eager")]["first"], runs[("bf16", "eager")]["first"]
    init = {f"student.{k}": v for k, v in ctx["init_student"].items()}

    def update(w: dict) -> torch.Tensor:
        keys = [k for k in init if w.get(k) is not None and w[k].is_floating_point()]
        return torch.cat([(w[k].double().cpu() - init[k].double().cpu()).reshape(-1) for k in keys])

    d32, d16 = update(w32), update(w16)
    cosine = torch.nn.functional.cosine_similarity(d32, d16, dim=0).item()
    out = {
        "loss_fp32": l32.item(),
        "loss_bf16": l16.item(),
        "loss_rel_diff": abs(l16.item() - l32.item()) / abs(l32.item()),
        "logits_max_rel_diff": ((z16 - z32).abs().max() / z32.abs().max()).item(),
        "first_update_cosine": cosine,
        "first_update_norm_ratio": (d16.norm() / d32.norm()).item(),
        "after_all_steps_rel_diff": max_rel_diff(runs[("off", "eager")]["last"], runs[("bf16", "eager")]["last"]),
    }
    out["pass"] = out["loss_rel_diff"] < 2e-2 and cosine > 0.98
    if not out["pass"]:
        raise CheckFailed(
            f"bf16 step disagrees with fp32: loss {out['loss_rel_diff']:.2e}, update cosine {cosine:.4f}", out
        )
    return out


def fast_recipe(device: torch.device, sizes: Sizes, train_set, test_set, name: str, tmp: Path) -> dict:
    from kdlab.fast.teachers import prepare_teachers
    from kdlab.student import Data

    overrides = [f"train.device={device.type}"]
    if device.type != "cuda":  # RerunGraphs stands in for the capture, which needs the table in "device" memory
        overrides.append("train.fast.cache_storage=device")
    if sizes.fast_batch is not None:
        overrides.append(f"train.batch_size={sizes.fast_batch}")
    recipe = load_recipe(ROOT / "recipes" / "cifar100" / "fast" / name, overrides)
    cfg = recipe.train
    sub = train_set.subset(slice(0, min(sizes.cache_images, len(train_set))))
    full_n = len(train_set) if train_set.name != "synthetic" else CIFAR100_TRAIN
    torch.manual_seed(0)
    student = model(recipe.student.name, sizes)
    teacher = model(recipe.teachers[0].name, sizes).eval().requires_grad_(False)
    data = Data(sub, test_set, 100, 3)
    train_loader, test_loader = data.loaders(recipe, cfg.batch_size, device, recipe.seed)
    distiller = Distiller(student, [teacher], recipe.loss).to(device)
    x0, y0 = next(iter(test_loader))
    distiller.build(x0[:8], y0[:8])
    autocast = compute.autocast_factory(cfg, device)

    sync(device)
    t0 = time.perf_counter()
    cache = prepare_teachers(distiller, sub, train_loader, cfg, tmp / name / "logits", autocast, lambda _m: None)
    sync(device)
    build_s = time.perf_counter() - t0
    table = cache.tables[0].logits
    size = table.numel() * table.element_size()

    # lookups against the live (folded, channels_last, autocast) teacher on real training batches
    worst, exact, count = 0.0, 0, 0
    train_loader.set_epoch(0)
    with torch.no_grad():
        for i, (x, _y, index, view) in enumerate(train_loader.iter_batches(with_meta=True)):
            if i >= sizes.hit_batches:
                break
            if compute.use_channels_last(cfg, device):
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                live = distiller.teachers[0](x).float()
            cached = cache.lookup(index, view)[0]
            worst = max(worst, ((cached - live).abs().max() / live.abs().max()).item())
            exact += int((cached == live).all(dim=1).sum())
            count += len(live)
    bf16 = table.dtype == torch.bfloat16

    # epochs of the recipe's train section on the subset; the first one warms up and captures
    epochs = sizes.fast_epochs
    run_cfg = cfg.model_copy(update={"epochs": epochs, "eval_every": 10_000})
    graphs = RerunGraphs([distiller]) if device.type != "cuda" else None
    with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
        state = train.fit(
            distiller, train_loader, None, run_cfg, Path(run_dir), lambda _m: None, teacher_cache=cache, graphs=graphs
        )
    seconds = [row["seconds"] for row in state.history]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    step_s = steady / len(train_loader)
    for _ in range(2):  # the second one: cuDNN has picked its kernels for the evaluation shapes
        sync(device)
        t0 = time.perf_counter()
        train.evaluate(distiller.student, test_loader, autocast, compute.use_channels_last(cfg, device))
        eval_s = time.perf_counter() - t0
    full_steps = full_n // cfg.batch_size
    full_test = 10_000 if sizes.test_images is not None or test_set.name == "synthetic" else len(test_set)
    eval_full = eval_s * full_test / len(test_set)
    cache_full = build_s * full_n / len(sub)
    epoch_full = step_s * full_steps
    total = cache_full + recipe.train.epochs * (epoch_full + eval_full)
    return {
        "recipe": f"recipes/cifar100/fast/{name}",
        "teacher": recipe.teachers[0].name,
        "student": recipe.student.name,
        "models_used": f"{teacher.__class__.__name__}/{student.__class__.__name__}"
        + (" (dry-run stand-ins)" if sizes.models else ""),
        "batch": cfg.batch_size,
        "subset_images": len(sub),
        "options": bench._options(cfg, device),
        "cache": {
            "dtype": str(table.dtype).removeprefix("torch."),
            "storage": cache.storage,
            "views": table.shape[1],
            "build_seconds": round(build_s, 2),
            "size_mib": round(size / 2**20, 1),
            "full_set_size_gib": round(size * full_n / len(sub) / 2**30, 2),
            "full_set_build_seconds": round(cache_full, 1),
            "hit_max_rel_diff": worst,
            "hit_exact_rows": f"{exact}/{count}",
            # bf16 storage rounds each logit once: 2^-8 of its magnitude, plus the other batch size's kernels
            "hit_pass": worst <= (1 / 64 if bf16 else 1e-5),
        },
        "epoch_seconds_measured": seconds,
        "steps_per_epoch_measured": len(train_loader),
        "step_seconds": round(step_s, 5),
        "images_per_s": round(cfg.batch_size / step_s, 1),
        "eval_seconds_full_test": round(eval_full, 2),
        "full_run": {
            "epochs": recipe.train.epochs,
            "steps_per_epoch": full_steps,
            "epoch_seconds": round(epoch_full, 2),
            "cache_build_seconds": round(cache_full, 1),
            "total_seconds": round(total, 1),
            "total_hours": round(total / 3600, 3),
        },
    }


def fast_recipes(device, sizes, train_set, test_set, tmp: Path) -> dict:
    out, failed = {}, []
    for name in FAST_RECIPES:
        try:
            out[name] = fast_recipe(device, sizes, train_set, test_set, name, tmp)
            if not out[name]["cache"]["hit_pass"]:
                failed.append(
                    f"{name}: cache lookups differ from the live teacher by "
                    f"{out[name]['cache']['hit_max_rel_diff']:.2e}"
                )
        except Exception as e:  # the other recipe still runs
            out[name] = {"error": _one_line(e), "traceback": traceback.format_exc(limit=6)}
            failed.append(f"{name}: {_one_line(e)}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if failed:
        raise CheckFailed("; ".join(failed), out)
    return out


def run_bench(device: torch.device, sizes: Sizes) -> dict:
    report = bench.run_bench(
        bench.parse_pairs(sizes.bench_pairs),
        ["kd"],
        ["reference", "kdlab", "kdlab-fast"],
        device,
        batch_size=sizes.bench_batch,
        steps=sizes.bench_steps,
        warmup=sizes.bench_warmup,
        workers=sizes.bench_workers,
        log=lambda _m: None,
    )
    bench.print_table(report)
    return report


def stream_imagenet(device: torch.device, sizes: Sizes, tmp: Path) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stream_loader

    from kdlab.data.stream import open_stream

    root = tmp / "stream-folder"
    t0 = time.perf_counter()
    width, height = sizes.stream_side
    stream_loader.make_folder(root, sizes.stream_images, width=width, height=height)
    generated = time.perf_counter() - t0
    ds = open_stream(root, "train", sizes.stream_size)
    rows = stream_loader.decode_rows(
        ds, sizes.stream_batch, list(sizes.stream_workers), 2, 2, device, log=lambda m: print(f"  {m}", flush=True)
    )
    batches = len(ds) // sizes.stream_batch - (sizes.stream_step_workers * 2 + 1)
    step = stream_loader.train_step_rate(
        ds,
        sizes.stream_model,
        sizes.stream_batch,
        batches,
        sizes.stream_step_workers,
        2,
        device,
        log=lambda m: print(f"  {m}", flush=True),
    )
    return {
        "images": len(ds),
        "image_size": sizes.stream_size,
        "mean_file_bytes": round(sum(f.stat().st_size for f in (root / "train").rglob("*.jpg")) / len(ds)),
        "generate_seconds": round(generated, 1),
        "decode_augment": rows,
        "train_step": step,
    }


def torchrun_nccl(device: torch.device, tmp: Path) -> dict:
    if device.type != "cuda":
        raise Skipped("CPU: the 2-rank gloo jobs are tests/test_distributed.py's")
    if torch.cuda.device_count() < 2:
        raise Skipped(f"{torch.cuda.device_count()} CUDA device(s): the 2-process NCCL run needs 2")
    sets = [
        "train.epochs=1",
        "train.max_steps_per_epoch=20",
        "train.batch_size=64",
        "train.sync_bn=true",
        "train.fast.graph_step=true",
        "train.fast.cuda_graph=false",
        f"cache_dir={tmp / 'ddp_cache'}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "kdlab",
        "train",
        str(ROOT / "recipes" / "digits" / "kd.yaml"),
        "--out",
        str(tmp / "ddp"),
        "--quiet",
    ]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    result = {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "tail": (proc.stdout + proc.stderr)[-1500:],
    }
    if proc.returncode != 0:
        raise CheckFailed(f"torchrun exited with {proc.returncode}", result)
    result["result"] = json.loads((tmp / "ddp" / "result.json").read_text())
    return result


# ------------------------------------------------------------------------------------------ driver


class Skipped(Exception):
    pass


class CheckFailed(Exception):
    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def section(report: dict, name: str, fn, device: torch.device) -> None:
    t0 = time.perf_counter()
    entry: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        entry = {"status": "ok", **fn()}
    except Skipped as e:
        entry = {"status": "skipped", "note": str(e)}
    except CheckFailed as e:
        entry = {"status": "failed", "error": str(e), **e.details}
    except Exception as e:
        entry = {"status": "failed", "error": _one_line(e), "traceback": traceback.format_exc(limit=8)}
    finally:
        with contextlib.suppress(Exception):
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        entry["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        entry["max_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    report["sections"][name] = entry
    detail = " - " + entry.get("error", entry.get("note", "")) if entry["status"] != "ok" else ""
    print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s){detail}", flush=True)


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    s = report["sections"]

    def add(name: str, what: str):
        e = s.get(name, {})
        rows.append(
            (
                name,
                e.get("status", "-"),
                f"{e.get('seconds', 0):.0f}",
                what if e.get("status") == "ok" else e.get("error", e.get("note", ""))[:90],
            )
        )

    g = s.get("graph_vs_eager", {})
    add(
        "graph_vs_eager",
        f"captured vs eager max rel diff: fp32 {g.get('off_captured_vs_eager_max_rel_diff', 0):.1e}, "
        f"bf16 {g.get('bf16_captured_vs_eager_max_rel_diff', 0):.1e}; sync check {g.get('sync_debug_mode')}",
    )
    b = s.get("bf16_vs_fp32", {})
    add(
        "bf16_vs_fp32",
        f"loss rel diff {b.get('loss_rel_diff', 0):.1e}, logits {b.get('logits_max_rel_diff', 0):.1e}, "
        f"update cosine {b.get('first_update_cosine', 0):.4f}",
    )
    f = s.get("fast_recipe", {})
    parts = []
    for name in FAST_RECIPES:
        r = f.get(name, {})
        if "full_run" in r:
            c = r["cache"]
            parts.append(
                f"{r['teacher']}->{r['student']}: {r['images_per_s']:.0f} img/s, "
                f"240 ep ~{r['full_run']['total_hours']:.2f} h, "
                f"cache {c['full_set_size_gib']} GiB/{c['full_set_build_seconds']:.0f} s, "
                f"hit diff {c['hit_max_rel_diff']:.1e}"
            )
    add("fast_recipe", "; ".join(parts))
    rep = s.get("bench", {})
    kd = [r for r in rep.get("results", []) if r["task"] == "kd"]
    add("bench", "; ".join(f"{r['pair']} {r['mode']} {r['images_per_s']:.0f} img/s" for r in kd))
    st = s.get("stream_imagenet", {})
    dec = ", ".join(f"{r['workers']}w {r['images_per_s']:.0f}" for r in st.get("decode_augment", []))
    ts = st.get("train_step") or {}
    add(
        "stream_imagenet",
        f"decode+augment img/s {dec}; {ts.get('model')} step {ts.get('streamed_images_per_s', 0):.0f} img/s "
        f"streamed vs {ts.get('resident_images_per_s', 0):.0f} resident",
    )
    add("torchrun_nccl", "2 ranks finished" if s.get("torchrun_nccl", {}).get("status") == "ok" else "")
    return rows


def print_summary(report: dict) -> None:
    rows = summary_rows(report)
    print(
        f"\nkdlab gpu_check on {report['device']} ({report['data']}), {report['seconds']:.0f} s"
        f"{' [dry run]' if report['dry_run'] else ''}"
    )
    widths = [max(len(r[i]) for r in rows + [("section", "status", "s", "")]) for i in range(3)]
    print(f"{'section':<{widths[0]}}  {'status':<{widths[1]}}  {'s':>{widths[2]}}  result")
    for name, status, secs, what in rows:
        print(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {secs:>{widths[2]}}  {what}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cuda (the check); cpu only with --dry-run"
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes and models: the same code paths in seconds")
    ap.add_argument("--data", default=None, help=f"CIFAR-100 (any form kdlab reads); default {DEFAULT_DATA} if present")
    ap.add_argument("--synthetic", action="store_true", help="synthetic data even where CIFAR-100 is present")
    ap.add_argument(
        "--out", default=None, help="the JSON report (default benchmarks/results/gpu_check-<device>-<date>.json)"
    )
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "for the CPU dry run: --device cpu --dry-run",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and not args.dry_run:
        print(
            "gpu_check: the CPU runs only the dry run (--device cpu --dry-run); the measurements need CUDA",
            file=sys.stderr,
        )
        return 2
    sizes = DRY if args.dry_run else Sizes()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t_start = time.perf_counter()
    train_set, test_set, note = load_data(args, sizes, device)
    report = {
        "check": "kdlab gpu_check",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": bench.device_name(device),
        "device_type": device.type,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "kdlab": __version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "data": note,
        "sizes": asdict(sizes),
        "sections": {},
    }
    ctx: dict = {}
    with tempfile.TemporaryDirectory(prefix="kdlab-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        plan = [
            ("graph_vs_eager", lambda: graph_vs_eager(device, sizes, train_set, ctx)),
            ("bf16_vs_fp32", lambda: bf16_vs_fp32(device, sizes, ctx)),
            ("fast_recipe", lambda: fast_recipes(device, sizes, train_set, test_set, tmp)),
            ("bench", lambda: run_bench(device, sizes)),
            ("stream_imagenet", lambda: stream_imagenet(device, sizes, tmp)),
            ("torchrun_nccl", lambda: torchrun_nccl(device, tmp)),
        ]
        for name, fn in plan:
            if name in skip:
                report["sections"][name] = {"status": "skipped", "note": "--skip", "seconds": 0.0}
                continue
            section(report, name, fn, device)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"gpu_check-{device.type}-{datetime.date.today()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_summary(report)
    print(f"JSON: {out}")
    return 1 if any(e["status"] == "failed" for e in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
