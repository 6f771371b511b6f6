"""Throughput of the streaming image-folder loader (data.loader: stream), alone and under a training step.

    python benchmarks/stream_loader.py [--root PATH] [--images 512] [--size 224] [--batch 64] [--workers 0 1 2]
        [--model resnet18_imagenet] [--step-batch 16] [--step-batches 6] [--step-workers 1] [--device cpu]
        [--json FILE]

Two measurements, on the ``train`` split of ``--root`` (a folder in kdlab's layout, ``train/<class>/*``; its
file index is built or read the way a run does it, beside the data or in the user cache), or, without
``--root``, of a synthetic folder generated in a temporary directory (``--images`` JPEGs of about 400x350
pixels, quality 90, 8 classes). With ``--root``, ``--images`` files spread evenly over the split are timed
(``--images 0``: all of it).

1. **decode + augment**, per worker count in ``--workers``: one epoch of :class:`~kdlab.data.stream.StreamLoader`
   in train mode, PIL decode + RandomResizedCrop(size) + flip in the workers, the uint8 -> float cast and the
   normalisation in the main process. Best of ``--repeats`` epochs, as images/s of the loader and images/s
   per decoding process (workers 0 decodes in the main process: one process).
2. **training step**: the same loader (``--step-workers`` workers, working ahead while the main process
   computes) feeding a real SGD step of ``--model`` (forward, cross-entropy, backward, update) on
   ``--device``; images/s over ``--step-batches`` batches after ``workers x prefetch + 1`` warm-up batches
   (the batches the workers decode ahead while the first step runs come for free; past them the loader and
   the step run at their steady rates). For comparison the step alone, repeated on one resident batch, gives
   the compute-bound rate: when the streamed rate is close to it, the loader keeps up.

The main process uses ``--threads`` torch threads (default 1: on a small machine the workers need the
other cores). Prints a table; JSON: ``--json`` or benchmarks/results/stream_loader-<date>.json.
benchmarks/gpu_check.py runs the same two measurements on CUDA (section ``stream_imagenet``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdlab import models
from kdlab.data.folder_index import folder_index
from kdlab.data.stream import StreamDataset, StreamLoader, open_stream


def make_folder(
    root: Path,
    n: int,
    classes: int = 8,
    seed: int = 0,
    width: tuple[int, int] = (360, 440),
    height: tuple[int, int] = (315, 385),
    test: bool = True,
    ext: str = "jpg",
) -> None:
    """``n`` smooth random images in train/ (a photo-like JPEG size, unlike white noise), sides drawn in
    ``width`` x ``height``; test/ gets one per class."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(width[0], width[1] + 1)), int(rng.integers(height[0], height[1] + 1))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        for split in ("train", "test") if test else ("train",):
            d = root / split / f"class{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < classes:
                Image.fromarray(arr).save(d / f"{i:05d}.{ext}", quality=90)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(loader: StreamLoader, epoch: int) -> float:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    for _x, _y in loader:
        pass
    sync(loader.device)
    return time.perf_counter() - t0


def decode_rows(
    ds: StreamDataset, batch: int, workers: list[int], prefetch: int, repeats: int, device="cpu", log=print
):
    """Per worker count: images/s of train-mode epochs (decode + RandomResizedCrop + flip), the best of
    ``repeats``, and that rate per decoding process."""
    rows = []
    for w in workers:
        loader = StreamLoader(ds, batch, train=True, device=device, workers=w, prefetch=prefetch)
        best = min(epoch_seconds(loader, e) for e in range(repeats))
        images = len(loader) * batch
        rate = images / best
        rows.append(
            {
                "workers": w,
                "images": images,
                "seconds": round(best, 3),
                "images_per_s": round(rate, 1),
                "images_per_s_per_worker": round(rate / max(w, 1), 1),
            }
        )
        log(f"decode+augment, workers {w}: {rate:8.1f} images/s, {rate / max(w, 1):7.1f} per process")
    return rows


def train_step_rate(
    ds: StreamDataset,
    model_name: str,
    batch: int,
    batches: int,
    workers: int,
    prefetch: int,
    device: torch.device,
    log=print,
    warmup: int | None = None,
) -> dict:
    """images/s of SGD steps of ``model_name`` fed by the streaming loader, after ``warmup`` batches (default
    ``workers x prefetch + 1``: the workers' start, and the batches they decode ahead meanwhile, untimed),
    and of the same step repeated on one resident batch."""
    warmup = workers * prefetch + 1 if warmup is None else warmup
    torch.manual_seed(0)
    model = models.create(model_name, num_classes=ds.num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    loader = StreamLoader(ds, batch, train=True, device=device, workers=workers, prefetch=prefetch)
    if len(loader) < warmup + batches:
        raise SystemExit(
            f"stream_loader: {len(ds)} images make {len(loader)} batches of {batch}; the step needs "
            f"{warmup} + {batches} (more --images, or lower --step-batch, --step-batches or --step-workers)"
        )
    it = loader.iter_batches()
    for _ in range(warmup):
        x, y = next(it)
        step(x, y)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        step(x, y)
    sync(device)
    streamed = time.perf_counter() - t0
    it.close()  # stops the workers before the resident-batch timing
    t0 = time.perf_counter()
    for _ in range(batches):
        step(x, y)
    sync(device)
    resident = time.perf_counter() - t0
    images = batches * batch
    out = {
        "model": model_name,
        "device": str(device),
        "batch": batch,
        "batches": batches,
        "warmup_batches": warmup,
        "workers": workers,
        "prefetch": prefetch,
        "streamed_seconds": round(streamed, 3),
        "streamed_images_per_s": round(images / streamed, 1),
        "resident_seconds": round(resident, 3),
        "resident_images_per_s": round(images / resident, 1),
    }
    log(
        f"{model_name} step at batch {batch} on {device}: {images / streamed:.1f} images/s streamed "
        f"({workers} worker(s)), {images / resident:.1f} images/s on a resident batch"
    )
    return out


def selection(n_rows: int, n: int) -> np.ndarray:
    """``n`` rows spread evenly over a split of ``n_rows`` (every class of a sorted folder), or all of them."""
    if n <= 0 or n >= n_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, n).round().astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="an image folder (train/<class>/*); default: a generated one")
    p.add_argument("--images", type=int, default=512, help="images generated, or timed of --root (0: all)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="resnet18_imagenet", help="the training step's model ('none': no step)")
    p.add_argument("--step-batch", type=int, default=16)
    p.add_argument("--step-batches", type=int, default=6)
    p.add_argument("--step-workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.root:
            root, source = Path(args.root).expanduser(), str(args.root)
        else:
            root, source = Path(tmp), f"generated: {args.images} JPEGs of about 400x350, quality 90, 8 classes"
            t0 = time.perf_counter()
            make_folder(root, args.images)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        first = folder_index(root, "train")
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = folder_index(root, "train")
        cached_s = time.perf_counter() - t0
        ds = open_stream(root, "train", args.size)
        sel = selection(len(ds), args.images if args.root else 0)
        ds = ds.subset(sel) if len(sel) < len(first) else ds
        nbytes = int(first.nbytes[sel].sum())
        rows = decode_rows(ds, args.batch, args.workers, args.prefetch, args.repeats, device)
        step = None
        if args.model != "none":
            step = train_step_rate(
                ds, args.model, args.step_batch, args.step_batches, args.step_workers, args.prefetch, device
            )
    result = {
        "benchmark": "stream_loader",
        "command": " ".join(["python benchmarks/stream_loader.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__,
            "pillow": Image.__version__,
            "threads": args.threads,
        },
        "folder": source,
        "images": len(ds),
        "mean_file_bytes": round(nbytes / len(ds)),
        "image_size": args.size,
        "batch": args.batch,
        "prefetch": args.prefetch,
        "index_seconds": round(index_s, 3),
        "index_from_cache": first.from_cache,
        "cached_index_seconds": round(cached_s, 4) if again.from_cache else None,
        "decode_augment": rows,
        "train_step": step,
    }
    built = "read back" if first.from_cache else "built"
    print(f"index: {index_s:.2f} s {built} ({len(first)} files), {cached_s * 1000:.1f} ms read back")
    out = args.json or str(
        Path(__file__).resolve().parent / "results" / f"stream_loader-{datetime.date.today().isoformat()}.json"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
