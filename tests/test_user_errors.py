"""A new user's rough edges: each bad input ends in one line naming the problem and exit code 2 (issue 27)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from helpers import refused

from kdlab import checkpoint
from kdlab.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
LATIN1 = "method: kd\nnote: caf\xe9\n".encode("latin-1")  # 0xe9 alone is not UTF-8


# ----------------------------------------------------------------------------------------------
# Files that are not UTF-8


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(LATIN1)
    line = refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "run")], recipe, "not UTF-8", "line 2")
    assert "0xe9" in line
    assert not (tmp_path / "run").exists()


def test_a_run_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(LATIN1)
    refused(capsys, ["train", "--resume", str(run)], run / "config.yaml", "not UTF-8")


def test_a_table_that_is_not_utf8_is_one_line(tmp_path, capsys):
    table = tmp_path / "table.yaml"
    table.write_bytes(b"title: caf\xe9\n")
    refused(capsys, ["reproduce", str(table), "--out", str(tmp_path / "out")], table, "not UTF-8")


def test_kdlab_table_names_a_result_that_is_not_utf8(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "result.json").write_bytes(b'{"top1_last": "\xe9"}')
    (run / "config.yaml").write_bytes(LATIN1)
    refused(capsys, ["table", str(run)], run, "no readable result.json")


def _raw_safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def test_safetensors_headers_that_are_not_utf8_or_not_an_object_are_named(tmp_path, capsys):
    for name, header in {
        "latin1": b'{"__metadata__": {"kdlab": "caf\xe9"}}',
        "list": b"[1, 2]",
    }.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(_raw_safetensors(header))
        refused(capsys, ["eval", str(path)], path, "corrupt")
        try:
            checkpoint.load(path)
        except CheckpointError as e:
            assert str(path) in str(e)
        else:
            raise AssertionError(name)


def test_kdlab_metadata_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save(path, {}, None)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta_json = json.dumps([1])
    header["__metadata__"] = {"kdlab": meta_json, "digest": checkpoint.file_digest({}, meta_json)}
    path.write_bytes(_raw_safetensors(json.dumps(header).encode()) + raw[8 + n :])
    try:
        checkpoint.load(path)
    except CheckpointError as e:
        assert "not an object" in str(e)
    else:
        raise AssertionError("a list as metadata was taken")


def test_readme_python_api_example_runs_as_pasted():
    """The README's first python block is what a new user pastes: it must define what it uses and run."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no python example"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert set(namespace["terms"]) >= {"ce", "at", "kd"}
    assert namespace["student"].conv1.weight.grad is not None


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_malicious_pth_is_refused_naming_what_and_how_to_convert(tmp_path):
    """A pickle that would call a function must be refused in kdlab's words: what it holds, that it is not
    loaded, how to convert a trusted file; never torch's advice to switch the safeguard off."""
    import torch

    bad = tmp_path / "teacher.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _RunsCode()}, bad)
    try:
        checkpoint.load_weights(bad)
    except CheckpointError as e:
        message = str(e)
    else:
        raise AssertionError("a pickle with a callable was loaded")
    assert "\n" not in message
    assert "will not load it" in message and "getcwd" in message
    assert "safetensors" in message
    assert "weights_only=False" not in message
