"""`kdlab bench` runs on the CPU (a smoke test: two steps of a tiny pair; no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab.cli import main
from kdlab.data import DeviceLoader, default_augment
from kdlab.tools import bench


def test_bench_smoke_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--pairs",
            "smallcnn_wide:smallcnn",
            "--methods",
            "kd",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    for key in (
        "date",
        "command",
        "device",
        "device_type",
        "torch",
        "kdlab",
        "cpu_count",
        "load_average_before",
        "load_average_after",
        "batch_size",
        "steps",
        "warmup",
        "data",
        "modes",
        "results",
        "summary",
    ):
        assert key in report, key
    assert report["device_type"] == "cpu" and report["batch_size"] == 16 and report["steps"] == 2
    assert "synthetic" in report["data"]
    rows = report["results"]
    tasks = ["teacher", "student", "kd"]
    assert [(r["task"], r["mode"]) for r in rows] == [(t, m) for t in tasks for m in bench.MODES]
    for r in rows:
        assert r["pair"] == "smallcnn_wide:smallcnn"
        assert r["images_per_s"] > 0
        assert r["peak_memory_mib"] is not None and r["peak_memory_mib"] > 0
        assert r["memory_kind"].startswith("rss") and r["peak_reserved_mib"] is None
        reference = next(x for x in rows if x["task"] == r["task"] and x["mode"] == "reference")
        assert r["ratio_to_reference"] == pytest.approx(r["images_per_s"] / reference["images_per_s"], rel=1e-2)
    fast_kd = next(r for r in rows if r["task"] == "kd" and r["mode"] == "kdlab-fast")
    assert "BN folded" in fast_kd["options"] and "channels_last" in fast_kd["options"]
    assert "kdlab_overhead_vs_minimal_pct" in report["summary"]["smallcnn_wide:smallcnn/kd"]
    assert "kdlab bench" in capsys.readouterr().out  # the table was printed


def test_table_shows_the_spread_of_repeats(capsys):
    def row(mode, runs, ratio):
        return {
            "pair": "a:b",
            "task": "kd",
            "mode": mode,
            "images_per_s": sorted(runs)[len(runs) // 2],
            "images_per_s_runs": runs,
            "ratio_to_reference": ratio,
            "peak_memory_mib": 10.0,
            "options": mode,
        }

    report = {
        "device": "cpu",
        "device_type": "cpu",
        "batch_size": 8,
        "steps": 3,
        "warmup": 1,
        "repeats": 3,
        "load_average_before": [0.0],
        "load_average_after": [0.0],
        "data": "synthetic",
        "results": [row("reference", [90.0, 100.0, 120.0], 1.0), row("kdlab", [130.0, 150.0, 171.0], 1.5)],
    }
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "min-max" in out and "90-120" in out and "130-171" in out
    bench.print_table({**report, "repeats": 1})
    out = capsys.readouterr().out
    assert "min-max" not in out and "reserved MiB" not in out  # CPU rows have no reserved figure
    # CUDA rows: max_memory_reserved beside the allocated peak (a CUDA graph's pool is reserved, not allocated)
    cuda = {**report, "device_type": "cuda", "results": [{**r, "peak_reserved_mib": 64.0} for r in report["results"]]}
    bench.print_table(cuda)
    out = capsys.readouterr().out
    assert "reserved MiB" in out and "max_memory_reserved" in out


def test_bench_rejects_bad_input_with_one_line(capsys):
    assert main(["bench", "--device", "cpu", "--pairs", "resnet56-resnet20"]) == 2
    assert main(["bench", "--device", "cpu", "--pairs", "resnet56:resnet2O"]) == 2
    assert main(["bench", "--device", "cpu", "--methods", "kd,srd"]) == 2
    assert (
        main(["bench", "--device", "cpu", "--steps", "0", "--pairs", "smallcnn_wide:smallcnn", "--methods", "kd"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("kdlab: error: ") for line in err)
    assert "TEACHER:STUDENT" in err[0] and "resnet2O" in err[1] and "srd" in err[2]


def test_timed_window_counts_only_the_steps_between_its_marks():
    window = bench.Window(warmup=2, steps=3, device=torch.device("cpu"))
    seen = list(window.wrap(range(100)))
    assert seen == [0, 1, 2, 3, 4]  # warm-up + timed steps, then the loop is told to stop
    assert window.seconds >= 0
    data = bench.synthetic_dataset(64)
    loader = DeviceLoader(data, 16, train=True, augment=default_augment("cifar100"))
    timed = bench.TimedLoader(loader, bench.Window(1, 2, torch.device("cpu")))
    assert len(timed) == 4 and timed.batch_size == 16
    assert len(list(timed.iter_batches(with_meta=True))) == 3


def test_reference_augmentation_is_a_crop_and_flip_of_the_image():
    data = bench.synthetic_dataset(4)
    ds = bench.PerImageAugmented(data)
    torch.manual_seed(0)
    x, y, i = ds[1]
    assert y == data.labels[1] and i == 1
    pixels = (x * torch.tensor(data.std).view(-1, 1, 1) + torch.tensor(data.mean).view(-1, 1, 1)) * 255
    pixels = pixels.round().to(torch.int64)
    padded = torch.nn.functional.pad(data.images[1].to(torch.int64), (4, 4, 4, 4))
    windows = [padded[:, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
    assert any(torch.equal(pixels, w) or torch.equal(pixels, w.flip(2)) for w in windows)


@pytest.mark.parametrize("method", sorted(bench.METHODS))
def test_hand_written_losses_equal_the_distillers(method):
    # the reference and minimal loops must compute what kdlab computes, or the comparison means nothing
    from kdlab import models
    from kdlab.distiller import Distiller

    spec = bench.METHODS[method]
    torch.manual_seed(0)
    teachers = [models.create("smallcnn_wide", 10).eval() for _ in range(spec.teachers)]
    student = models.create("smallcnn", 10)
    distiller = Distiller(student, teachers, spec.loss)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    distiller.build(x, y)
    labels, idx = torch.arange(20_000) % 10, torch.arange(8) * 7
    y = labels[idx]
    crd = None
    if method == "crd":  # the same bank and embeddings on both sides, and the same random negatives below
        distiller.attach_training_set(labels)
        crd = bench.HandCRD(bench.Models(teachers, student), labels, torch.device("cpu"))
        term = distiller.terms["crd"]
        crd.embed_s.load_state_dict(term.embed_s.state_dict())
        crd.embed_t.load_state_dict(term.embed_t.state_dict())
        crd.banks = [term.memory_s.clone(), term.memory_t.clone()]
        crd.sampler = torch.Generator()
        crd.sampler.set_state(term.sampler.get_state())
    distiller.train()
    torch.manual_seed(5)
    expected, _, _ = distiller(x, y, progress=100.0, indices=idx)  # past DKD's warm-up: the full term
    translators = list(distiller.terms["feed"].translators) if method == "pfeed2" else []
    s_hooks = bench.HandFeatureHooks(student, bench._stage_names(student, method))
    t_hooks = [bench.HandFeatureHooks(t, bench._stage_names(t, method)) for t in teachers]
    with torch.no_grad():
        t_logits = [t(x) for t in teachers]
    t_feats = [h.take() for h in t_hooks]
    s_logits = student(x)
    torch.manual_seed(5)
    value = bench.hand_loss(method, s_logits, y, s_hooks.take(), t_logits, t_feats, translators, crd, idx)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
