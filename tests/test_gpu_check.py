"""benchmarks/gpu_check.py: its CPU dry run goes through every section, and without CUDA the real check
says so in one line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_runs_every_section(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check().main(["--device", "cpu", "--dry-run", "--synthetic", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert {k: v["status"] for k, v in sections.items()} == {
        "graph_vs_eager": "ok",
        "bf16_vs_fp32": "ok",
        "fast_recipe": "ok",
        "bench": "ok",
        "stream_imagenet": "ok",
        "torchrun_nccl": "skipped",
    }
    graph = sections["graph_vs_eager"]
    assert graph["graph"].startswith("RerunGraphs") and graph["steps"] == 6
    # the same kernels on the CPU: the captured (re-run) steps equal the eager ones exactly
    assert graph["off_captured_vs_eager_max_rel_diff"] == 0 and graph["bf16_captured_vs_eager_max_rel_diff"] == 0
    assert graph["off_eager_calls_after_capture"] == 0
    assert 0 < sections["bf16_vs_fp32"]["first_update_cosine"] <= 1.0 + 1e-9
    for name in ("resnet56_resnet20_kd_b512.yaml", "resnet32x4_resnet8x4_kd_b512.yaml"):
        fast = sections["fast_recipe"][name]
        assert fast["cache"]["hit_max_rel_diff"] == 0 and fast["cache"]["hit_pass"]  # fp32 table on the CPU: exact
        assert fast["full_run"]["epochs"] == 240 and fast["full_run"]["total_seconds"] > 0
        assert "graph step" in fast["options"] and "teacher cache" in fast["options"]
    kd = [r for r in sections["bench"]["results"] if r["task"] == "kd"]
    assert [r["mode"] for r in kd] == ["reference", "kdlab", "kdlab-fast"]
    stream = sections["stream_imagenet"]
    assert stream["images"] == 24 and [r["workers"] for r in stream["decode_augment"]] == [0, 1]
    assert all(r["images"] == 24 and r["images_per_s"] > 0 for r in stream["decode_augment"])
    step = stream["train_step"]
    assert (
        step["model"] == "resnet8"
        and step["batches"] == 3
        and step["warmup_batches"] == 3
        and step["streamed_images_per_s"] > 0
    )
    printed = capsys.readouterr().out
    assert "kdlab gpu_check on" in printed and "fast_recipe" in printed and str(out) in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_the_check_refuses_in_one_line(capsys):
    module = gpu_check()
    assert module.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_check: no CUDA device here") and "\n" not in err
    assert module.main(["--device", "cpu"]) == 2  # the CPU only dry-runs
    assert "--dry-run" in capsys.readouterr().err
