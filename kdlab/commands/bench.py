"""`kdlab bench`: images/s of kdlab's training paths against a reference loop (see kdlab.tools.bench)."""

from __future__ import annotations

from kdlab.commands import add_device, add_quiet

NAME = "bench"
HELP = (
    "training speed: teacher forward, student step and distillation step per mode "
    "(reference, minimal, kdlab, kdlab-fast)"
)


def add_arguments(p) -> None:
    from kdlab.commands import int_range

    p.add_argument(
        "--pairs", default="resnet56:resnet20,resnet32x4:resnet8x4", help="TEACHER:STUDENT,... (default: %(default)s)"
    )
    p.add_argument(
        "--methods",
        default="kd,nst,pfeed2",
        help="kd, nst, pfeed2 (FEED with 2 teachers), dkd, "
        "crd (CRD's bank over a CIFAR-sized 50,000-image synthetic set)",
    )
    p.add_argument("--modes", default="reference,minimal,kdlab,kdlab-fast", help="(default: %(default)s)")
    add_device(p)
    p.add_argument(
        "--steps", type=int_range(1, 100_000), default=10, help="timed steps per measurement (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=int_range(0, 100_000), default=None, help="untimed steps first (default: 2 on CPU, 5 on CUDA)"
    )
    p.add_argument("--batch-size", type=int_range(1, 65_536), default=64)
    p.add_argument(
        "--repeats",
        type=int_range(1, 1000),
        default=1,
        help="measure every mode this many times, interleaved; report the median",
    )
    p.add_argument(
        "--workers",
        type=int_range(0, 1024),
        default=None,
        help="reference DataLoader workers (default: 2 on CPU, 8 on CUDA)",
    )
    p.add_argument("--compile", action="store_true", help="kdlab-fast: also torch.compile the distiller")
    p.add_argument(
        "--teacher-cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="kdlab-fast, logit-only methods: the exact teacher cache (auto: on for CUDA; on CPU building it "
        "costs 162 teacher passes per image)",
    )
    p.add_argument("--json", dest="json_out", help="write the report to this JSON file")
    add_quiet(p, "no per-measurement lines")


def run(args) -> int:
    import json
    from pathlib import Path

    from kdlab.checkpoint import atomic_write_text
    from kdlab.compute import resolve_device
    from kdlab.tools import bench

    pairs = bench.parse_pairs(args.pairs)
    methods = bench.parse_list(args.methods, bench.METHODS, "methods")
    modes = bench.parse_list(args.modes, bench.MODES, "modes")
    device = resolve_device(args.device)
    cache = {"auto": None, "on": True, "off": False}[args.teacher_cache]
    report = bench.run_bench(
        pairs,
        methods,
        modes,
        device,
        args.batch_size,
        args.steps,
        args.warmup,
        args.repeats,
        args.workers,
        args.compile,
        cache,
        log=(lambda _m: None) if args.quiet else print,
    )
    bench.print_table(report)
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
