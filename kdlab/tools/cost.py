"""What a table cell cost: the student's measured training time, the teachers' (trained here, or given
weights), and the forward/backward passes of one step, derived from the recipe's terms' flags."""

from __future__ import annotations

import json
from pathlib import Path

from kdlab.losses import TERMS

METRICS = "metrics.jsonl"
GIVEN = "given weights"


def training_seconds(run_dir: Path) -> float | None:
    """The sum of the epochs' measured `seconds` in the run's metrics.jsonl (training and evaluation); None when
    the file is missing or holds no timed epoch."""
    path = Path(run_dir) / METRICS
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    total, seen = 0.0, False
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("seconds"), (int, float)):
            total += float(row["seconds"])
            seen = True
    return total if seen else None


def teacher_seconds(result: dict, base: Path | None = None) -> float | str | None:
    """The training time of the teachers that taught this run (their cache folders' metrics, summed), `GIVEN`
    when every teacher came as given weights, None when there is no teacher or a trained one's metrics are gone.

    A teacher trained here is recorded with its `top1_last` and its folder as `source` (as the run was given it:
    tried as it reads, then below `base`); given weights carry only their path."""
    infos = result.get("teachers") or []
    if not infos:
        return None
    trained = [t for t in infos if "top1_last" in t and t.get("source")]
    if not trained:
        return GIVEN
    total = 0.0
    for t in trained:
        folder = Path(t["source"])
        if not folder.exists() and not folder.is_absolute() and base is not None:
            folder = Path(base) / folder
        seconds = training_seconds(folder)
        if seconds is None:
            return None
        total += seconds
    return total


def mean_seconds(values: list) -> float | None:
    """The mean of the measured values (None, and GIVEN, are not measurements); None when there is none."""
    measured = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(measured) / len(measured) if measured else None


def cell_teacher_cost(costs: list) -> float | str | None:
    """Over a cell's seeds (`teacher_seconds` of each): GIVEN when every seed's teachers were given weights, else
    the mean of the measured training times."""
    if costs and all(c == GIVEN for c in costs):
        return GIVEN
    return mean_seconds(costs)


def passes_per_step(config: dict | None) -> dict | None:
    """Passes of one training step over a batch, from the recipe (config.yaml): the student's forwards (one per
    view: 1 + the largest `extra_views` of its terms) and backwards (1 + the terms' `extra_backward`), and the
    teachers' forwards (each teacher on each view; 0 when no term reads a teacher, or when the teachers' logits
    are read from train.teacher_cache). None without a config."""
    if not config:
        return None
    terms = [TERMS[n] for n in ((config.get("loss") or {}).get("terms") or {}) if n in TERMS]
    views = 1 + max((t.extra_views for t in terms), default=0)
    n_teachers = len(config.get("teachers") or []) or (1 if config.get("generations") else 0)
    uses_teacher = any(t.needs_teacher for t in terms)
    cached = bool((config.get("train") or {}).get("teacher_cache")) and uses_teacher
    dot = (config.get("train") or {}).get("optimizer") == "dot"
    return {
        "student_forward": views,
        # DOT back-propagates the distillation terms and the cross-entropy apart
        "student_backward": 1 + sum(t.extra_backward for t in terms) + (dot and bool(terms)),
        "teacher_forward": 0 if cached or not uses_teacher else n_teachers * views,
        "teacher_cached": cached,
    }


def fmt_passes(p: dict | None) -> str:
    """'1F+1B, teacher 1F' (student forwards + backwards, teacher forwards); 'teacher cached' for the logit cache."""
    if p is None:
        return "-"
    text = f"{p['student_forward']}F+{p['student_backward']}B"
    if p["teacher_cached"]:
        return text + ", teacher cached"
    return text + (f", teacher {p['teacher_forward']}F" if p["teacher_forward"] else "")


def fmt_seconds(s: float | str | None) -> str:
    if s is None:
        return "-"
    if isinstance(s, str):
        return s
    if s < 600:
        return f"{s:.0f} s"
    hours, minutes = divmod(round(s / 60), 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes} min"
