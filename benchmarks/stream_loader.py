"""Throughput of the streaming image-folder loader (data.loader: stream); prints a table and writes JSON.

    python benchmarks/stream_loader.py [--images 512] [--size 224] [--batch 64] [--workers 0 1 2] [--json FILE]

Builds a synthetic folder (JPEGs of about 400x350 pixels, quality 90, 8 classes) in a temporary directory,
times the first file index (every header read) and its cached re-read, then one training epoch of
``StreamLoader`` for each worker count: PIL decode + RandomResizedCrop(size) + flip in the workers, the
uint8 -> float cast and normalisation in the main process (on the CPU here). The best of ``--repeats``
epochs is reported, as images per second. JSON: benchmarks/results/stream_loader-<date>.json by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdlab.data.folder_index import folder_index
from kdlab.data.stream import StreamLoader, open_stream


def make_folder(root: Path, n: int, classes: int = 8, seed: int = 0) -> None:
    """Smooth random images (a photo-like JPEG size, unlike white noise), sizes around 400x350."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(360, 441)), int(rng.integers(315, 386))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        for split in ("train", "test"):
            d = root / split / f"class{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < classes:
                Image.fromarray(arr).save(d / f"{i:05d}.jpg", quality=90)


def epoch_seconds(loader: StreamLoader, epoch: int) -> float:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    for _x, _y in loader:
        pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, args.images)
        nbytes = sum(f.stat().st_size for f in (root / "train").rglob("*.jpg"))
        t0 = time.perf_counter()
        folder_index(root, "train")
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert folder_index(root, "train").from_cache
        cached_s = time.perf_counter() - t0
        ds = open_stream(root, "train", args.size)
        rows = []
        for workers in args.workers:
            loader = StreamLoader(ds, args.batch, train=True, workers=workers, prefetch=args.prefetch)
            best = min(epoch_seconds(loader, e) for e in range(args.repeats))
            images = len(loader) * args.batch
            rows.append(
                {
                    "workers": workers,
                    "images": images,
                    "seconds": round(best, 3),
                    "images_per_s": round(images / best, 1),
                }
            )
            print(f"workers {workers}: {images / best:8.1f} images/s ({images} images in {best:.2f} s)", flush=True)
    result = {
        "benchmark": "stream_loader",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__,
            "pillow": Image.__version__,
        },
        "images": args.images,
        "mean_jpeg_bytes": round(nbytes / args.images),
        "image_size": args.size,
        "batch": args.batch,
        "prefetch": args.prefetch,
        "index_seconds": round(index_s, 3),
        "cached_index_seconds": round(cached_s, 4),
        "rows": rows,
    }
    print(f"index: {index_s:.2f} s built ({args.images} headers), {cached_s * 1000:.1f} ms read back")
    out = args.json or str(
        Path(__file__).resolve().parent / "results" / f"stream_loader-{datetime.date.today().isoformat()}.json"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
