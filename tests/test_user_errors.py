"""A new user's rough edges: each bad input ends in one line naming the problem and exit code 2 (issue 27)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import refused

from kdlab import checkpoint, cli
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


# ----------------------------------------------------------------------------------------------
# The common options: the same spelling on every command, and errors that name the option


QUICK_DIGITS = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2"]


def _subparser(name: str):
    from kdlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _option(parser, flag: str):
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_train_reproduce_and_eval_share_their_common_options():
    for flag, commands in (("--data-root", ("train", "reproduce", "eval")), ("--set", ("train", "reproduce"))):
        found = [_option(_subparser(c), flag) for c in commands]
        assert all(found), (flag, commands)
        assert len({(a.dest, a.metavar) for a in found}) == 1, flag


def test_train_takes_data_root(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDLAB_CIFAR100", raising=False)
    nowhere = tmp_path / "nowhere"
    args = ["train", "kd", "--set", "data.name=cifar100", "--data-root", str(nowhere), "--out", str(tmp_path / "r")]
    refused(capsys, args, nowhere, "no such file")


def test_a_missing_data_root_names_the_cli_option_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDLAB_CIFAR100", raising=False)
    line = refused(capsys, ["train", "kd", "--set", "data.name=cifar100", "--out", str(tmp_path / "r")], "--data-root")
    assert "root=" not in line and "KDLAB_CIFAR100" in line
    run = tmp_path / "digits"
    assert cli.main(["train", "vanilla", "--out", str(run), "--quiet", *QUICK_DIGITS]) == 0
    capsys.readouterr()
    line = refused(capsys, ["eval", str(run), "--data", "cifar100"], "--data-root")
    assert "root=" not in line


def test_a_missing_data_root_names_root_in_python(monkeypatch):
    from kdlab.data import load_dataset
    from kdlab.errors import DataError

    monkeypatch.delenv("KDLAB_CIFAR100", raising=False)
    with pytest.raises(DataError, match=r"pass root= \("):
        load_dataset("cifar100")


def test_resume_refuses_a_data_root(tmp_path, capsys):
    refused(capsys, ["train", "--resume", str(tmp_path), "--data-root", str(tmp_path)], "--data-root")


# ----------------------------------------------------------------------------------------------
# Validation errors that show the real problem


def test_an_unknown_key_is_shown_first_with_every_other_problem(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("method: kd\nstudnet:\n  name: resnet8\ntrain:\n  lr: -1\n")
    line = refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], "studnet: unknown key", "student")
    assert line.index("studnet: unknown key") < line.index("student: Field required") and "train.lr" in line
    assert "more)" not in line


def test_nested_section_problems_each_keep_their_full_key(tmp_path, capsys):
    recipe = tmp_path / "terms.yaml"
    recipe.write_text("method: kd\nstudent: {name: resnet8}\nloss:\n  terms:\n    kd: {T: -1, tempreature: 4}\n")
    line = refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], "loss.terms.kd.tempreature")
    assert line.index("tempreature") < line.index("loss.terms.kd.T")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_an_empty_recipe_is_called_empty(tmp_path, capsys, text):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], recipe, "is empty")


def test_an_empty_table_is_called_empty(tmp_path, capsys):
    table = tmp_path / "empty.yaml"
    table.write_text("# nothing yet\n")
    refused(capsys, ["reproduce", str(table), "--out", str(tmp_path / "o")], table, "is empty")
