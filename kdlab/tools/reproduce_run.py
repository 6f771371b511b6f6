"""Running a reproduction table: every run in this process, or (`jobs` > 1) in N worker processes.

Each task (a teacher to train, or one cell x seed) runs in its own process started as
`python -m kdlab.tools.reproduce_run TASK-JSON`; the worker re-plans the table from the same invocation
and runs exactly that task, so it trains what a one-process run would train, in the same folders.
Teachers come first and each one is trained by one worker only (tasks are keyed by the teacher's
cache folder); a cell starts once every teacher it needs is finished. A worker that dies, however it
dies, fails only its own task: the folder it left is resumed by the next invocation.

On CPU each worker gets one torch thread (`OMP_NUM_THREADS=1`, unless the caller set it), which is
faster than sharing threads between processes; with several GPUs each worker gets its own GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdlab.errors import KdlabError, MissingDataRoot
from kdlab.lock import BusyError, RunLock
from kdlab.tools.reproduce import Invocation, Job, Table, load_table, run_job
from kdlab.tools.reproduce_report import write_report

HEARTBEAT_SECONDS = 300.0
POLL_SECONDS = 1.0


@dataclass
class Task:
    """A teacher (`teacher_index` set) or a student run of one cell and seed."""

    cell: str
    seed: int
    teacher_index: int | None = None
    folder: Path = field(default=Path())
    needs: set[Path] = field(default_factory=set)

    @property
    def label(self) -> str:
        if self.teacher_index is None:
            return f"{self.cell} seed {self.seed}"
        return f"teacher {self.folder.name}"

    @property
    def slug(self) -> str:
        return self.label.replace("/", "_").replace(" ", "_")


def tasks_of(jobs: list[Job]) -> list[Task]:
    """Teachers first (each cache folder once, in the order the cells need them), then the cells."""
    from kdlab.teachers import teacher_run_dir, trained_teachers

    teachers: dict[Path, Task] = {}
    cells = []
    for job in jobs:
        needs = set()
        for index, spec in trained_teachers(job.recipe):
            folder = teacher_run_dir(job.recipe, index, spec, job.run_dir).resolve()
            needs.add(folder)
            teachers.setdefault(folder, Task(job.cell.name, job.seed, index, folder))
        cells.append(Task(job.cell.name, job.seed, None, job.run_dir, needs))
    return list(teachers.values()) + cells


def is_finished(task: Task) -> bool:
    from kdlab.student import read_result

    return read_result(task.folder) is not None


def worker_env(slot: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
    return env


def progress_line(tasks: list[Task], done: set[int], failed: dict[int, str], running: dict[int, tuple]) -> str:
    left = len(tasks) - len(done) - len(failed) - len(running)
    names = ", ".join(tasks[i].label for i in running) or "none"
    return (
        f"[{time.strftime('%H:%M:%S')}] {len(done)} done, {len(failed)} failed, {len(running)} running ({names}), "
        f"{left} waiting"
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_table(
    table_path: str | Path,
    out: str | Path,
    seeds: int | None = None,
    only: list[str] | None = None,
    sets: list[str] = (),
    data_root: str | None = None,
    quiet: bool = False,
    say: Callable[[str], None] = print,
    cache_dir: str | Path | None = None,
    jobs: int = 1,
) -> dict:
    """Run (or continue) every cell x seed of the table into `out`, then write the comparison.

    `jobs` > 1: independent runs in that many worker processes."""
    inv = Invocation(
        str(table_path),
        str(out),
        seeds,
        list(only) if only else None,
        list(sets),
        data_root,
        str(cache_dir) if cache_dir else None,
        jobs,
        quiet,
    )
    table_path, out = Path(table_path), Path(out)
    table = load_table(table_path)
    planned = inv.plan(table)
    with table_lock(out):
        return _run_planned(table, inv, planned, out, quiet, say, jobs)


@contextmanager
def table_lock(out: Path) -> Iterator[None]:
    """Held for the whole invocation: a second `kdlab reproduce` into the same folder is refused at its start,
    before it touches a cell (two runners would each take cells the other is training and report them failed)."""
    lock = RunLock(out)
    try:
        lock.acquire()
    except BusyError:
        owner = lock.owner()
        who = f" (pid {owner[1]})" if owner else ""
        raise KdlabError(
            f"{out} is in use by another kdlab reproduce{who}; wait for it to finish (rerun then to continue), "
            "or use another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _run_planned(
    table: Table, inv: Invocation, planned: list[Job], out: Path, quiet: bool, say: Callable[[str], None], jobs: int
) -> dict:
    from kdlab.student import read_result

    n_cells = len({j.cell.name for j in planned})
    say(
        f"{table.title}: {len(planned)} run(s) ({n_cells} cell(s), {len(planned) - n_cells} extra seed run(s)) in {out}"
        + (f", {jobs} worker processes" if jobs > 1 else "")
    )
    t_table = time.time()
    if jobs > 1:
        failures = run_parallel(inv, table, planned, say)
    else:
        failures = {}
        for i, job in enumerate(planned, 1):
            tag = f"[{i}/{len(planned)}] {job.label}"
            done = read_result(job.run_dir)
            if done is not None:
                say(f"{tag}: finished earlier (top-1 last {done['top1_last']:.2f}), skipped")
                continue
            say(
                f"{tag}: {'resuming' if (job.run_dir / 'config.yaml').exists() else 'starting'} "
                f"({job.recipe.method}, {job.recipe.student.name})"
            )
            t0 = time.time()
            try:
                result = run_job(job, quiet)
            except MissingDataRoot:  # every cell would fail the same way: say it once
                raise
            except KdlabError as e:  # one failed cell does not stop the table; it is reported at the end
                failures[job.label] = str(e)
                say(f"{tag}: FAILED: {e}")
                continue
            say(
                f"{tag}: top-1 last {result['top1_last']:.2f} best {result['top1_best']:.2f} "
                f"({_minutes(time.time() - t0)})"
            )
            write_report(table, inv, failures)
    summary = write_report(table, inv, failures)
    finished = len(planned) - len(failures)
    say(
        f"{table.title}: {finished}/{len(planned)} run(s) finished "
        f"({_minutes(time.time() - t_table)} this invocation); "
        f"wrote {out / 'results.md'}, {out / 'results.json'}"
        + (f", {out / 'deltas.png'}" if summary.get("chart") else "")
    )
    if failures:
        raise KdlabError(f"{len(failures)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return summary


def run_parallel(inv: Invocation, table: Table, jobs: list[Job], say: Callable[[str], None]) -> dict[str, str]:
    """Run every unfinished task with at most `inv.jobs` workers; returns {run label: error} of failed runs."""
    tasks = tasks_of(jobs)
    done = {i for i, t in enumerate(tasks) if is_finished(t)}
    failed: dict[int, str] = {}
    running: dict[int, tuple[subprocess.Popen, int, float]] = {}
    logs = Path(inv.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    finished_folders = {tasks[i].folder for i in done}
    say(
        f"{len(tasks)} task(s): {sum(t.teacher_index is not None for t in tasks)} teacher(s) and "
        f"{sum(t.teacher_index is None for t in tasks)} run(s); {len(done)} finished earlier; worker logs in {logs}"
    )

    def ready(i: int) -> bool:
        return i not in done and i not in failed and i not in running and tasks[i].needs <= finished_folders

    def blocked(i: int) -> str | None:
        bad = [tasks[j].label for j in failed if tasks[j].folder in tasks[i].needs]
        return f"its teacher failed ({', '.join(bad)})" if bad else None

    def start(i: int) -> None:
        slot = min(set(range(inv.jobs)) - {s for _, s, _ in running.values()})
        spec = json.dumps(
            {
                "invocation": asdict(inv),
                "cell": tasks[i].cell,
                "seed": tasks[i].seed,
                "teacher_index": tasks[i].teacher_index,
            }
        )
        log = open(logs / f"{tasks[i].slug}.log", "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdlab.tools.reproduce_run", spec],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(slot),
        )
        log.close()
        running[i] = (proc, slot, time.time())
        verb = "resuming" if (tasks[i].folder / "checkpoints").exists() else "started"
        say(f"{verb} {tasks[i].label} (worker {slot}, pid {proc.pid})")

    last_beat = time.time()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    interruptible()
    try:
        while True:
            for i in range(len(tasks)):
                reason = blocked(i) if i not in done and i not in failed and i not in running else None
                if reason:
                    failed[i] = reason
                    say(f"{tasks[i].label}: not run: {reason}")
            for i in range(len(tasks)):
                if len(running) < inv.jobs and ready(i):
                    start(i)
            if not running:
                break
            time.sleep(POLL_SECONDS)
            for i, (proc, _slot, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[i]
                minutes = (time.time() - t0) / 60
                if rc == 0 and is_finished(tasks[i]):
                    done.add(i)
                    finished_folders.add(tasks[i].folder)
                    say(
                        f"finished {tasks[i].label} in {minutes:.1f} min{result_text(tasks[i])}; "
                        + progress_line(tasks, done, failed, running)
                    )
                    if tasks[i].teacher_index is None:
                        write_report(table, inv, {})
                else:
                    failed[i] = last_error(logs / f"{tasks[i].slug}.log", rc)
                    say(f"FAILED {tasks[i].label} after {minutes:.1f} min: {failed[i]}")
            if time.time() - last_beat >= HEARTBEAT_SECONDS:
                say(progress_line(tasks, done, failed, running))
                last_beat = time.time()
    except KeyboardInterrupt:
        stop_workers(running, say)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {tasks[i].label: msg for i, msg in failed.items()}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interruptible() -> None:
    """SIGTERM (a scheduler, `kill`) and SIGINT act as Ctrl-C, even in a process started in the background,
    where the shell leaves SIGINT ignored."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def result_text(task: Task) -> str:
    from kdlab.student import read_result

    result = read_result(task.folder) or {}
    return f" (top-1 last {result['top1_last']:.2f})" if "top1_last" in result else ""


def last_error(log: Path, rc: int) -> str:
    """The worker's one-line `kdlab: error:` if it printed one, else its exit status and log file."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln.removeprefix("kdlab: error: ") for ln in lines if ln.startswith("kdlab: error: ")]
    if errors:
        return errors[-1]
    how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
    return f"worker {how}; see {log}"


def stop_workers(running: dict[int, tuple], say: Callable[[str], None]) -> None:
    """Ctrl-C reaches the workers through the terminal; a worker still alive after that is sent SIGTERM by its pid,
    which it handles as Ctrl-C: it checkpoints and stops like an interrupted `kdlab train`."""
    grace = time.time() + 5  # a terminal's Ctrl-C reached them already: give them time to checkpoint
    while time.time() < grace and any(proc.poll() is None for proc, _, _ in running.values()):
        time.sleep(0.2)
    deadline = time.time() + 60
    for proc, _, _ in running.values():
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for proc, _, _ in running.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    say("workers stopped; rerun the same command to continue (finished runs are kept, interrupted ones resume)")


def work(spec: dict) -> None:
    """One task, in a worker process."""
    from kdlab.student import Log, load_data
    from kdlab.teachers import train_teacher, trained_teachers

    inv = Invocation(**spec["invocation"])
    table = load_table(inv.table)
    inv.only = [spec["cell"]]
    job = next(j for j in inv.plan(table) if j.seed == spec["seed"])
    if spec["teacher_index"] is None:
        run_job(job, inv.quiet)
        return
    index = spec["teacher_index"]
    teacher = dict(trained_teachers(job.recipe))[index]
    data = load_data(job.recipe)
    train_teacher(job.recipe, index, teacher, data, job.run_dir, Log(None, inv.quiet))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m kdlab.tools.reproduce_run TASK-JSON (started by kdlab reproduce --jobs)\n")
        return 2
    import torch

    interruptible()
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        work(json.loads(argv[0]))
    except KdlabError as e:
        sys.stderr.write(f"kdlab: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("kdlab: interrupted; the run resumes from its last checkpoint\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
