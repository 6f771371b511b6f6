"""`kdlab ...`: the command line. User errors print one line and exit with code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

from kdlab.errors import KdlabError

EXIT_USAGE = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit) raised as Ctrl-C is, so that the same clean-up runs: the
    progress bar gives the terminal its cursor back, half-written files are removed, and the last epoch's
    checkpoint stays the one a resume starts from."""


def _raise_terminated(signum, frame):
    raise Terminated


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, code 2
        sys.stderr.write(f"kdlab: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdlab", description="Knowledge distillation of image classifiers.")
    from kdlab import __version__

    p.add_argument("--version", action="version", version=f"kdlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a recipe into a run directory, or resume one")
    t.add_argument("recipe", nargs="?", help="recipe YAML file, or a packaged recipe by name: kd, digits/kd, "
                   "imagenet/kd (kdlab recipes lists them)")
    t.add_argument("--out", help="run directory to create")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("--seed", type=int, help="override the recipe's seed")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.epochs=2 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines on stdout (log.txt still written)")

    e = sub.add_parser("eval", help="evaluate a run directory or a student.safetensors file")
    e.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    e.add_argument("--data", choices=["digits", "cifar10", "cifar100", "imagefolder"], help="default: the run's data set")
    e.add_argument("--data-root", help="default: the run's data.root")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")

    d = sub.add_parser("demo", help="train every method on the embedded digits data and print a table")
    d.add_argument("--out", default="runs/demo", help="output folder; rerun the same command to continue an interrupted demo")
    d.add_argument("--only", nargs="*", help="only these methods")
    d.add_argument("--quiet", action="store_true")

    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the registered methods")
    for module in command_modules():
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.HELP))
    return p


def command_modules() -> list:
    import importlib
    import pkgutil

    from kdlab import commands

    found = [importlib.import_module(f"kdlab.commands.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    return sorted(found, key=lambda m: m.NAME)


def cmd_train(args) -> int:
    from kdlab import pipeline
    from kdlab.config import load_recipe

    from kdlab.config import find_recipe
    from kdlab.errors import NonFiniteLoss

    out = Path(args.resume or args.out or ".")
    args.resume_hint = lambda: _train_resume_hint(out)
    try:
        if args.resume:
            if args.recipe or args.overrides or args.seed is not None:
                raise KdlabError("--resume DIR continues a run as it was configured; drop the recipe, --set and --seed")
            result = pipeline.run(None, out, resume=True, quiet=args.quiet)
        else:
            if not args.recipe or not args.out:
                raise KdlabError("train needs RECIPE.yaml and --out DIR (or --resume DIR)")
            recipe = load_recipe(find_recipe(args.recipe), args.overrides, args.seed)
            result = pipeline.run(recipe, out, quiet=args.quiet)
    except NonFiniteLoss as e:  # how a remedy is applied depends on what the run left behind
        if pipeline.has_progress(out):
            how = f"--resume keeps the run's recipe, so apply it in a new run (another --out than {out})"
        else:
            how = f"nothing to resume, so rerun with --set and the same --out {out}"
        raise NonFiniteLoss(f"{e}; {how}") from None
    print(json.dumps({k: result[k] for k in ("top1_last", "top1_best", "top5_last", "epochs", "seed", "params")}))
    return 0


def _train_resume_hint(out: Path) -> str:
    if not (out / "config.yaml").exists():
        return "nothing was started yet; run the same command again"
    return (f"continue with 'kdlab train --resume {shlex.quote(str(out))}' (from the last finished epoch; "
            "finished teachers are kept)")


def cmd_eval(args) -> int:
    from kdlab import checkpoint, models
    from kdlab.config import DataConfig, read_yaml
    from kdlab.data import DeviceLoader, load_dataset
    from kdlab.student import resolve_weights
    from kdlab.train import evaluate, resolve_device

    path, meta = resolve_weights(Path(args.weights))
    if "model" not in meta:
        raise KdlabError(f"{path}: no model name in its metadata; was it written by kdlab?")
    run_cfg = path.parent / "config.yaml"
    data = DataConfig.model_validate(read_yaml(run_cfg).get("data", {})) if run_cfg.exists() else DataConfig()
    name = args.data or data.name
    root = args.data_root or (data.root if name == data.name else None)
    kw = {"image_size": data.image_size, "skip_unreadable": data.skip_unreadable} if name == "imagefolder" else {}
    test = load_dataset(name, root, split="test", **kw)
    if test.skipped:
        sys.stderr.write(f"kdlab: {len(test.skipped)} unreadable file(s) left out of the test set; first: {test.skipped[0]}\n")
    model = models.create(meta["model"], num_classes=meta.get("num_classes", test.num_classes), in_chans=meta.get("in_chans", 3),
                          **meta.get("kwargs", {}))
    checkpoint.load_state_into(model, checkpoint.load(path)[0], str(path))
    if test.num_classes != meta.get("num_classes", test.num_classes) or test.images.shape[1] != meta.get("in_chans", 3):
        raise KdlabError(f"{path}: model has {meta.get('num_classes')} classes / {meta.get('in_chans')} channels, "
                         f"data {name} has {test.num_classes} / {test.images.shape[1]}")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    metrics = evaluate(model.to(device), DeviceLoader(test, 256, train=False, device=device))
    metrics.update(model=meta["model"], data=name, images=len(test.labels), seconds=round(time.perf_counter() - t0, 3))
    print(json.dumps(metrics))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_models(_args) -> int:
    from kdlab import models

    for name in models.names():
        print(name)
    return 0


def cmd_methods(_args) -> int:
    from kdlab.methods import METHODS

    width = max(map(len, METHODS))
    for m in METHODS.values():
        print(f"{m.name:<{width}}  {m.summary}")
    return 0


def cmd_demo(args) -> int:
    from kdlab.demo import run_demo

    again = ["kdlab", "demo", "--out", args.out] + (["--only", *args.only] if args.only else []) + (["--quiet"] if args.quiet else [])
    args.resume_hint = lambda: (f"rerun '{shlex.join(again)}' to continue (finished recipes are kept, the interrupted "
                                "one resumes from its last finished epoch)")
    run_demo(Path(args.out), only=args.only, quiet=args.quiet)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "models": cmd_models, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's own exits: a usage error (2, its line already printed), --help or --version (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handlers = {**COMMANDS, **{m.NAME: m.run for m in command_modules()}}
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled there
        previous = None
    try:
        return handlers[args.command](args)
    except KdlabError as e:
        sys.stderr.write(f"kdlab: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        hint = getattr(args, "resume_hint", None)
        after_echo = "\n" if sys.stderr.isatty() else ""  # a terminal shows ^C where the message would start
        sys.stderr.write(f"{after_echo}kdlab: {how}" + (f"; {hint()}" if hint else "") + "\n")
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:  # a disk that fills up mid-run, a folder removed under it: the checkpoints keep every finished epoch
        where = f"could not access {e.filename}: " if e.filename else ""
        sys.stderr.write(f"kdlab: error: {where}{e.strerror or e}\n")
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
