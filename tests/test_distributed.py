"""Data-parallel training under torchrun, on CPU with gloo: equivalence with one process, failure, resume.

The torchrun jobs are real (`python -m torch.distributed.run ... -m kdlab train`), two ranks on this
machine; the collectives kdlab adds (global-batch BatchNorm, LP's gather) are also checked in two
spawned ranks against naive float64 references.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import become_torchrun_rank, wait_until

from kdlab import checkpoint, distributed, models, pipeline, sync_bn
from kdlab.errors import ConfigError
from kdlab.recipe_files import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EPOCHS, STEPS = 4, 4
# LP's kNN graph over the global batch and BatchNorm over the global batch: nothing then depends on
# how the global batch of 64 is split, so two ranks of 32 must train exactly like one process of 64.
# NCHW: oneDNN's NHWC convolutions (the CPU default) round differently with the batch size and the
# thread count (~1e-6 per step, grown to ~2e-3 in the weights after 16 steps), which would hide the
# exactness this test is about.
EQUIVALENT = [
    f"train.epochs={EPOCHS}",
    f"train.max_steps_per_epoch={STEPS}",
    "train.batch_size=64",
    "train.sync_bn=true",
    "loss.terms.lp.gather=true",
    "train.channels_last=off",
]
TIMEOUT = 600  # a hang guard, not a timing: a two-rank job takes about 30-60 s quiet, 5-10x that loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "kdlab",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", distributed.ENV_TIMEOUT: "60"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def finish(proc: subprocess.Popen) -> str:
    try:
        out = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s")
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)[0]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache):
    """One uninterrupted two-rank LP run (its teacher trained by the same job), shared by two tests."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    t0 = time.perf_counter()
    proc = torchrun(
        "train",
        str(RECIPES / "digits" / "lp.yaml"),
        "--out",
        str(out),
        "--quiet",
        *sets(EQUIVALENT + [f"cache_dir={cache}"]),
    )
    text = finish(proc)
    assert proc.returncode == 0, text
    return out, text, time.perf_counter() - t0


def test_two_ranks_train_like_one_process_at_the_global_batch(ddp_run, tmp_path):
    out, text, seconds = ddp_run
    single_dir = tmp_path / "single"
    pipeline.run(load_recipe(RECIPES / "digits" / "lp.yaml", EQUIVALENT), single_dir, quiet=True)  # its own teacher

    # the teacher was trained inside the torchrun job, distributed too (same cache key, same weights)
    (ddp_teacher,) = Path(json.loads((out / "result.json").read_text())["teachers"][0]["source"]).glob(
        "student.safetensors"
    )
    (one_teacher,) = (single_dir / "teachers").glob("*/student.safetensors")
    assert ddp_teacher.parent.name == one_teacher.parent.name
    assert max_diff(weights(ddp_teacher), weights(one_teacher)) < 1e-5
    ddp_rows, one_rows = metrics(out), metrics(single_dir)
    assert [r["epoch"] for r in ddp_rows] == [r["epoch"] for r in one_rows] == list(range(1, EPOCHS + 1))
    for d, s in zip(ddp_rows, one_rows):
        for key in ("train_loss", "train_ce", "train_lp", "test_loss"):
            assert abs(d[key] - s[key]) < 1e-5, (d["epoch"], key, d[key], s[key])
        assert d["test_top1"] == s["test_top1"]  # the ranks' halves of the test set, summed
    assert max_diff(weights(out / "student.safetensors"), weights(single_dir / "student.safetensors")) < 1e-5

    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    # only rank 0 speaks: one result line on stdout, one line per epoch in log.txt
    assert len(re.findall(r'^\{"top1_last"', text, re.M)) == 1, text
    log = (out / "log.txt").read_text()
    assert len(re.findall(r"^epoch 1 \|", log, re.M)) == 1, log
    print(f"\n2-rank torchrun (teacher + student, {EPOCHS} x {STEPS} steps each): {seconds:.1f} s")


def _epochs_done(run_dir: Path) -> int:
    try:
        return checkpoint.load(run_dir / "checkpoints" / "last.safetensors")[1]["epoch"]
    except Exception:
        return 0


def _worker_pids(agent_pid: int) -> dict[str, int]:
    """The torchrun agent's children by their RANK."""
    pids = {}
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in environ if b"=" in kv)
        if "RANK" in env:
            pids[env["RANK"]] = pid
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc (Linux)")
def test_killed_rank_stops_the_job_and_resume_ends_like_the_uninterrupted_run(ddp_run, tmp_path, cache):
    reference, _, _ = ddp_run
    run_dir = tmp_path / "killed"
    t0 = time.perf_counter()
    proc = torchrun(
        "train",
        str(RECIPES / "digits" / "lp.yaml"),
        "--out",
        str(run_dir),
        "--quiet",
        *sets(EQUIVALENT + [f"cache_dir={cache}"]),
    )  # the teacher comes from the cache
    # the kill is decided by what the job wrote (the first epoch's checkpoint), not by the clock
    try:
        wait_until(lambda: _epochs_done(run_dir) >= 1, proc, "the first checkpoint", timeout=TIMEOUT)
    except AssertionError as e:
        raise AssertionError(f"{e}: " + finish(proc)) from None
    os.kill(_worker_pids(proc.pid)["1"], signal.SIGKILL)
    t_kill = time.perf_counter()
    text = finish(proc)  # bounded: fails the test instead of hanging
    exit_seconds = time.perf_counter() - t_kill
    assert proc.returncode != 0, text
    # torchrun names the rank that died and how; rank 0 (when it notices before torchrun stops it) says how to go on
    assert re.search(r"Root Cause.*?rank\s*:\s*1 .*?SIGKILL", text, re.S), text
    for line in re.findall(r"^kdlab: error: .*$", text, re.M):
        assert "lost contact" in line and f"--resume {run_dir}" in line, line
    assert not (run_dir / "result.json").exists()

    resumed = torchrun("train", "--resume", str(run_dir), "--quiet")
    text = finish(resumed)
    assert resumed.returncode == 0, text
    assert not (run_dir / ".lock").exists()  # the killed job's stale lock was taken over, then released
    done = int(re.search(r"resuming after epoch (\d+)", (run_dir / "log.txt").read_text()).group(1))
    assert 1 <= done < EPOCHS
    a, b = weights(reference / "student.safetensors"), weights(run_dir / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # gloo sums two ranks in a fixed order: bit-identical
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(1, EPOCHS + 1))
    print(
        f"\nkill after epoch {done}: the job exited {exit_seconds:.1f} s after the kill; "
        f"kill + resume took {time.perf_counter() - t0:.1f} s"
    )


# ----------------------------------------------------------------------------------------------
# Two spawned ranks: the collectives against naive references


def naive_batchnorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def naive_lp(s: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """The spec's LP loss with explicit loops: kNN by teacher distance (ties to the lower index)."""
    n = s.shape[0]
    s, t = s.reshape(n, -1).double(), t.reshape(n, -1).double()
    dist_t = [[float(((t[i] - t[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    pairs = [
        (i, j) for i in range(n) for j in sorted((j for j in range(n) if j != i), key=lambda j: (dist_t[i][j], j))[:k]
    ]
    sigma2 = sum(dist_t[i][j] for i, j in pairs) / len(pairs)
    total = s.new_zeros(())
    for i, j in pairs:
        total = (
            total + torch.exp(torch.tensor(-dist_t[i][j] / sigma2, dtype=torch.float64)) * ((s[i] - s[j]) ** 2).sum()
        )
    return total / (n * k)


def _ranks_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    become_torchrun_rank(rank, world, port)
    from kdlab.losses.base import Outputs
    from kdlab.losses.lp import LP, LPOptions

    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    coeff_all = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    weight, bias = (
        torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    s_all, t_all = torch.randn(8, 5, generator=g), torch.randn(8, 7, generator=g)
    rows = slice(4 * rank, 4 * rank + 4)

    def checks() -> None:
        # global-batch BatchNorm: this rank's rows of BatchNorm over all 8 rows, in value and gradient
        bn = sync_bn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))[0]
        assert isinstance(bn, sync_bn.GlobalBatchNorm)
        with torch.no_grad():
            bn.weight.copy_(weight.float())
            bn.bias.copy_(bias.float())
        x = x_all[rows].float().requires_grad_(True)
        y = bn(x)
        (y * coeff_all[rows].float()).sum().backward()
        xr = x_all.clone().requires_grad_(True)
        wr, br = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        yr = naive_batchnorm(xr, wr, br, bn.eps)
        (yr * coeff_all).sum().backward()
        torch.testing.assert_close(y.double(), yr[rows].detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.grad.double(), xr.grad[rows], atol=1e-5, rtol=0)
        wgrad = distributed.all_reduce_sum(bn.weight.grad.clone())  # DDP would sum these too (then divide)
        torch.testing.assert_close(wgrad.double(), wr.grad, atol=1e-5, rtol=0)
        var_unbiased = x_all.var(dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(bn.running_mean.double(), 0.1 * x_all.mean(dim=(0, 2, 3)), atol=1e-6, rtol=0)
        torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var_unbiased, atol=1e-6, rtol=0)

        # LP: by default the kNN graph is built within this rank's share of the batch ...
        student = models.create("smallcnn", num_classes=10, in_chans=1)
        teacher = models.create("smallcnn_wide", num_classes=10, in_chans=1)
        for gather in (False, True):
            term = LP(LPOptions(k=2, gather=gather), student, [teacher])
            s = s_all[rows].clone().requires_grad_(True)
            out = Outputs(
                logits=torch.zeros(4, 10),
                targets=torch.zeros(4, dtype=torch.long),
                feats={term.student_layers[0]: s},
                teacher_feats=[{term.teacher_layers[0][0]: t_all[rows]}],
            )
            value = term(out)
            if not gather:
                local = naive_lp(s_all[rows], t_all[rows], 2)
                assert abs(value.item() - local.item()) < 1e-5
                assert abs(local.item() - naive_lp(s_all, t_all, 2).item()) > 1e-3  # the two really differ here
                continue
            # ... and with gather: true over the global batch, with the gradient of one process after DDP's mean
            sr = s_all.double().clone().requires_grad_(True)
            full = naive_lp(sr, t_all, 2)
            full.backward()
            value.backward()
            assert abs(value.item() - full.item()) < 1e-5
            torch.testing.assert_close((s.grad / world).double(), sr.grad[rows], atol=1e-6, rtol=0)

    if rank == 0:
        try:
            with distributed.session("cpu", run_dir):
                checks()
                distributed.barrier()
                distributed.barrier()  # rank 1 has left without a word
        except distributed.PeerLost as e:
            message = str(e)
        else:
            raise AssertionError("a barrier with a dead peer returned")
        assert message.startswith("rank 0 of 2: lost contact with another rank"), message
        assert f"kdlab train --resume {run_dir}" in message, message
    else:
        with distributed.session("cpu", run_dir):
            checks()
            distributed.barrier()
            sys.stdout.flush()
            os._exit(0)  # a peer that vanishes


def test_collectives_match_naive_references_and_a_lost_peer_is_reported(tmp_path):
    mp.spawn(_ranks_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


def test_global_batch_must_divide_among_the_ranks(monkeypatch):
    assert distributed.per_rank_batch(256, 8) == 32
    with pytest.raises(
        ConfigError, match=r"train.batch_size=100 is the global batch and must divide evenly among the 8 ranks"
    ):
        distributed.per_rank_batch(100, 8)
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "soon")
    with pytest.raises(ConfigError, match=distributed.ENV_TIMEOUT):
        distributed.timeout_seconds()
    assert not distributed.active() and distributed.world_size() == 1  # one process: every helper is a no-op


# ----------------------------------------------------------------------------------------------
# The ImageNet recipes on a tiny generated ImageFolder


def _tiny_imagefolder(root: Path, classes: int = 3, train: int = 8, val: int = 2) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


def test_imagenet_recipes_smoke(tmp_path):
    """The 224-px ResNet-34 -> ResNet-18 AT and KD recipes, shrunk: their teacher trained here instead of read from
    torchvision's weights (teachers.0.weights=null), 32-px images, one step."""
    root = _tiny_imagefolder(tmp_path / "imagenet")
    cache = tmp_path / "cache"
    pair = RECIPES / "imagenet" / "resnet34_resnet18"
    small = [
        f"data.root={root}",
        "data.image_size=32",
        "teachers.0.weights=null",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "train.batch_size=8",
        "train.lr=0.1",  # kd.yaml's mdistiller lr 0.2 would give its teacher another cache key than at.yaml's
        f"cache_dir={cache}",
    ]
    for name, batch, lr in (("kd", 512, 0.2), ("at", 256, 0.1)):
        recipe = load_recipe(pair / f"{name}.yaml")
        assert (recipe.student.name, recipe.teachers[0].name) == ("resnet18_imagenet", "resnet34_imagenet")
        t = recipe.train
        assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay) == (100, batch, lr, 0.9, 1e-4)
        assert (t.schedule.type, t.schedule.milestones, t.schedule.gamma) == ("multistep", [30, 60, 90], 0.1)

    proc = torchrun("train", str(pair / "at.yaml"), "--out", str(tmp_path / "at"), "--quiet", *sets(small))
    text = finish(proc)
    assert proc.returncode == 0, text
    at = json.loads((tmp_path / "at" / "result.json").read_text())
    assert at["world_size"] == 2 and 0 <= at["top1_last"] <= 100
    assert "train_at" in metrics(tmp_path / "at")[-1]
    # KD in one process, its teacher taken from the cache the torchrun job filled
    kd = pipeline.run(load_recipe(pair / "kd.yaml", small), tmp_path / "kd", quiet=True)
    assert kd["teachers"][0]["source"] == at["teachers"][0]["source"]
    assert kd["params"] == sum(p.numel() for p in models.create("resnet18_imagenet", num_classes=3).parameters())


def test_crd_two_ranks_train_like_one_process(tmp_path, cache):
    """CRD's bank is updated with every rank's samples and its negatives are drawn for the global batch from
    its own random stream, so two ranks of 32 keep the bank and the weights of one process of 64."""
    crd = [
        "train.epochs=2",
        "train.max_steps_per_epoch=3",
        "train.batch_size=64",
        "train.sync_bn=true",
        "train.channels_last=off",
        "loss.terms.crd.nce_k=256",
        f"cache_dir={cache}",
    ]
    out = tmp_path / "ddp"
    proc = torchrun("train", str(RECIPES / "digits" / "crd.yaml"), "--out", str(out), "--quiet", *sets(crd))
    text = finish(proc)
    assert proc.returncode == 0, text
    single = tmp_path / "single"
    pipeline.run(load_recipe(RECIPES / "digits" / "crd.yaml", crd), single, quiet=True)
    for d, s in zip(metrics(out), metrics(single)):
        assert abs(d["train_crd"] - s["train_crd"]) < 1e-4, (d, s)
    assert max_diff(weights(out / "student.safetensors"), weights(single / "student.safetensors")) < 1e-4
    banks = [checkpoint.load(p / "checkpoints" / "last.safetensors")[0] for p in (out, single)]
    for key in ("model.terms.crd.memory_s", "model.terms.crd.memory_t"):
        assert (banks[0][key] - banks[1][key]).abs().max().item() < 1e-4, key
