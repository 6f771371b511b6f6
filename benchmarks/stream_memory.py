"""Peak memory of one training epoch, streamed (data.loader: stream) against in memory, as the folder grows.

    python benchmarks/stream_memory.py [--counts 1000 10000] [--size 64] [--batch 64] [--workers 0 1] [--json FILE]

The streaming loader's claim is that its memory does not depend on the number of images: at most
``workers x prefetch`` decoded batches are in flight, plus the file index (a path, a label and three integers
per file). The in-memory loader holds every decoded image (N x 3 x size^2 bytes, and twice that while the
files are stacked). This script generates a folder of small JPEGs (about 64x64, quality 90, 10 classes) per
count in ``--counts``, builds each folder's file index once (as the first run on a folder does), then runs one
configuration per fresh subprocess, so that no peak carries over:

* ``stream``, per worker count in ``--workers``: :func:`~kdlab.data.stream.open_stream` + one train-mode epoch
  of :class:`~kdlab.data.stream.StreamLoader` (RandomResizedCrop(size) + flip);
* ``stream`` once more per worker count above 0, with ``MALLOC_MMAP_THRESHOLD_=1048576`` (see FIXED_THRESHOLD);
* ``memory``: :func:`~kdlab.data.imagefolder.load_imagefolder` of the train split + one train-mode epoch of
  :class:`~kdlab.data.loader.DeviceLoader` with the imagefolder default augmentation (crop after padding, flip).

Each child reports its peak resident set (``VmHWM`` of /proc/self/status; ``ru_maxrss`` where there is no
/proc) after the imports, and after the epoch; the difference is what the data path added. With workers, the
largest worker's own peak (``ru_maxrss`` of the reaped children) is reported too. Prints a table; JSON:
``--json`` or benchmarks/results/stream_memory-<date>.json. A benchmark, not a test: the figures depend on the
allocator and the machine; the point is how they change from the first count to the last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# glibc raises its mmap threshold after each large free (up to 32 MiB), after which the main process's
# per-batch buffers come from the heap, which fragments while worker batches arrive: its peak then grows
# over the first epoch, then levels off. A fixed threshold (M_MMAP_THRESHOLD, mallopt(3)) keeps large
# buffers in mmap: the row run with it shows what the loader itself holds.
FIXED_THRESHOLD = 1 << 20


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def child(args) -> dict:
    import torch

    from kdlab.data.augment import default_augment
    from kdlab.data.imagefolder import load_imagefolder
    from kdlab.data.loader import DeviceLoader
    from kdlab.data.stream import StreamLoader, open_stream

    torch.set_num_threads(1)
    before = peak_rss_mib()
    t0 = time.perf_counter()
    if args.loader == "stream":
        ds = open_stream(args.root, "train", args.size)
        loader = StreamLoader(ds, args.batch, train=True, workers=args.child_workers, prefetch=2)
    else:
        ds = load_imagefolder(args.root, "train", args.size)
        loader = DeviceLoader(ds, args.batch, train=True, augment=default_augment("imagefolder", args.size))
    seen = 0
    for x, _y in loader:
        seen += len(x)
    seconds = time.perf_counter() - t0
    del loader
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "images": len(ds),
        "images_seen": seen,
        "seconds": round(seconds, 2),
        "peak_rss_after_imports_mib": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "added_mib": round(peak_rss_mib() - before, 1),
        "largest_worker_peak_rss_mib": round(children, 1) if args.child_workers else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="worker counts of the stream runs")
    p.add_argument("--json")
    # one configuration, in the subprocess the parent starts
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loader", choices=["stream", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    sys.path.insert(0, str(HERE))
    from stream_loader import make_folder

    from kdlab.data.folder_index import folder_index

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            root = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            side = (args.size - args.size // 8, args.size + args.size // 8)
            make_folder(root, n, classes=10, seed=n, width=side, height=side, test=False)
            folder_index(root, "train")
            print(
                f"generated {n} JPEGs of about {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s", flush=True
            )
            configs = [("stream", w, None) for w in args.workers] + [("memory", 0, None)]
            configs += [("stream", w, FIXED_THRESHOLD) for w in args.workers if w > 0]
            for loader, workers, threshold in configs:
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    "--loader",
                    loader,
                    "--root",
                    str(root),
                ]
                cmd += ["--size", str(args.size), "--batch", str(args.batch), "--child-workers", str(workers)]
                child_env = env if threshold is None else {**env, "MALLOC_MMAP_THRESHOLD_": str(threshold)}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    return 1
                row = {"loader": loader, "workers": workers, "malloc_mmap_threshold": threshold}
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                rows.append(row)
                fixed = f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""
                print(
                    f"{n:>6} images  {loader:<6} workers {workers}{fixed}: peak RSS {row['peak_rss_mib']:7.1f} MiB "
                    f"(+{row['added_mib']:.1f} over the imports) in {row['seconds']:.1f} s",
                    flush=True,
                )
    head = f"{'images':>6}  {'loader':<6}  {'workers':>7}  {'malloc':<7}  {'peak MiB':>8}  {'added MiB':>9}"
    print(f"\n{head}  {'worker MiB':>10}")
    for r in rows:
        w = r["largest_worker_peak_rss_mib"]
        malloc = "fixed" if r["malloc_mmap_threshold"] else "default"
        print(
            f"{r['images']:>6}  {r['loader']:<6}  {r['workers']:>7}  {malloc:<7}  {r['peak_rss_mib']:>8.1f}  "
            f"{r['added_mib']:>9.1f}  {'-' if w is None else f'{w:.1f}':>10}"
        )
    result = {
        "benchmark": "stream_memory",
        "command": " ".join(["python benchmarks/stream_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
        },
        "image_size": args.size,
        "batch": args.batch,
        "decoded_bytes_per_image": 3 * args.size * args.size,
        "rows": rows,
    }
    out = args.json or str(HERE / "results" / f"stream_memory-{datetime.date.today().isoformat()}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
