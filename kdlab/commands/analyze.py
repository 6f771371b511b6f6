"""`kdlab analyze recon RUN_DIR...`: FEED's reconstruction-error analysis of trained students."""

from __future__ import annotations

NAME = "analyze"
HELP = "analyses of trained runs: 'recon' fits an autoencoder on a run's feature map and reports its test error"


def add_arguments(p) -> None:
    from kdlab.commands import int_range, positive_float

    p.add_argument("analysis", choices=["recon"])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--layer", help="tapped layer (default: the last stage)")
    p.add_argument("--rate", type=positive_float, default=0.5, help="bottleneck rate k (factor channels = k * C)")
    p.add_argument("--epochs", type=int_range(1, 100_000), default=10)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--loss", choices=["l1", "l2"], default="l1")
    p.add_argument(
        "--curve",
        action="store_true",
        help="also measure every kept epoch (train.keep_epochs) and every generation of a sequential run: "
        "the error along training (plot it with kdlab plot --recon --recon-curve)",
    )


def run(args) -> int:
    from pathlib import Path

    from kdlab.analysis.recon import analyze
    from kdlab.errors import KdlabError

    if args.epochs < 1 or args.rate <= 0 or args.lr <= 0:
        raise KdlabError("analyze recon: --epochs >= 1, --rate > 0 and --lr > 0 are required")
    rows = [
        analyze(Path(r), args.layer, args.rate, args.epochs, args.lr, args.loss, curve=args.curve) for r in args.runs
    ]
    width = max(len(r) for r in args.runs)
    print(f"{'run':<{width}}  {'method':<10}  recon error ({args.loss})")
    for path, row in zip(args.runs, rows):
        print(f"{path:<{width}}  {row['method']:<10}  {row['recon_error']:.5f}")
    return 0
