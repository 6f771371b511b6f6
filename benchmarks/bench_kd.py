"""Training-speed benchmark of kdlab against a reference KD loop; prints the table and writes JSON.

    python benchmarks/bench_kd.py [kdlab bench options...] [--json FILE]

The same as `kdlab bench` (see `kdlab bench --help` and kdlab/tools/bench.py for the modes), with the JSON
written to benchmarks/results/bench_kd-<device>-<date>.json unless --json is given. Examples:

    python benchmarks/bench_kd.py --device cpu --pairs resnet56:resnet20 --methods kd --repeats 3
    python benchmarks/bench_kd.py --device cuda --steps 50          # every default pair and method
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from kdlab.cli import main


def default_json(argv: list[str]) -> str:
    device = argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "auto"
    stamp = datetime.date.today().isoformat()
    return str(Path(__file__).resolve().parent / "results" / f"bench_kd-{device}-{stamp}.json")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--json" not in args:
        args += ["--json", default_json(args)]
    raise SystemExit(main(["bench", *args]))
