"""The documents stay true: generated parts match the code, examples run, commands parse, links resolve."""

import re
import shlex
from pathlib import Path

import pytest
import tomllib

from kdlab.cli import build_parser
from kdlab.methods import METHODS
from kdlab.tools import docgen

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = ["api.md", "getting-started.md"]  # their ```python blocks run here, in order, one namespace per file
CARD_SECTIONS = ("## Idea", "## Equation", "## Options", "## Recipe", "## Measured")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every ``` fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M)]


def all_docs() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def test_cli_reference_is_generated_from_the_current_parser():
    assert (DOCS / "cli.md").read_text() == docgen.cli_markdown(), (
        "docs/cli.md is stale: python -m kdlab.tools.docgen --write"
    )


def test_every_method_has_a_current_card():
    for name in METHODS:
        card = DOCS / "methods" / f"{name}.md"
        assert card.exists(), f"no method card for {name}"
        text = card.read_text()
        for section in CARD_SECTIONS:
            assert section in text, f"{card.name} lacks {section}"
        assert "<!-- BEGIN generated:options -->" in text and "<!-- BEGIN generated:recipe -->" in text
        assert docgen.refresh_card(text, name) == text, (
            f"{card.name}: generated blocks stale: python -m kdlab.tools.docgen --write"
        )
    assert docgen.main(["--check"]) == 0


def test_docgen_check_sees_a_stale_option_table(tmp_path, monkeypatch):
    card = (DOCS / "methods" / "kd.md").read_text().replace("`4.0`", "`5.0`", 1)
    assert docgen.refresh_card(card, "kd") != card
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "kd.md").write_text(card)
    monkeypatch.setattr(docgen, "METHOD_DIR", methods)
    assert docgen.main(["--check"]) == 1


@pytest.mark.parametrize("name", RUNNABLE)
def test_python_examples_run(name, tmp_path, monkeypatch, capsys):
    blocks = [body for info, body in fenced_blocks((DOCS / name).read_text()) if info == "python"]
    assert blocks, f"{name} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{name}[python block {i}]", "exec"), namespace)
        except Exception as e:  # name the block, so the failing document is obvious
            raise AssertionError(f"{name}, python block {i} failed: {type(e).__name__}: {e}") from e


def command_lines(text: str) -> list[str]:
    """Every `kdlab ...` line of the shell blocks, shell variables set to 0 and comments dropped."""
    lines = []
    for info, body in fenced_blocks(text):
        if info not in ("bash", "sh", "shell", "console"):
            continue
        for raw in body.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", raw):
                part = re.sub(r"\$\{?\w+\}?", "0", part.strip())
                if part.startswith("kdlab "):
                    lines.append(part)
    return lines


def test_every_documented_command_line_parses():
    parser = build_parser()
    seen = 0
    for doc in all_docs():
        for line in command_lines(doc.read_text()):
            argv = shlex.split(line, comments=True)[1:]
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                if e.code == 0:  # --version, --help: they print and leave
                    continue
                pytest.fail(f"{doc.relative_to(ROOT)}: `{line}` does not parse")
            seen += 1
    assert seen >= 10


def test_local_links_resolve():
    for doc in all_docs():
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{doc.relative_to(ROOT)} links to a missing {target}"


def test_demo_assets_are_present_and_small():
    table = (DOCS / "assets" / "demo_table.md").read_text()
    assert (
        "| recipe |" in table
        and "| vanilla | vanilla | smallcnn_narrow" in table
        and "| kd | kd | smallcnn_narrow" in table
    )
    assert "Δ vs vanilla" in table and "(3 seeds)" in table
    png = (DOCS / "assets" / "demo_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000


def test_cli_reference_expands_help_defaults():
    text = docgen.cli_markdown()
    assert "%(" not in text and "TEACHER:STUDENT,... (default: resnet56:resnet20,resnet32x4:resnet8x4)" in text


def test_getting_started_documents_the_teacher_cache():
    text = (ROOT / "docs" / "getting-started.md").read_text()
    assert "KDLAB_CACHE" in text and "--set train.epochs" in text


# timm and ONNX installs keep the user's torch


def test_test_extras_hold_onnx_and_nothing_that_replaces_torch():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {e.split(">")[0].split("=")[0].split("<")[0].strip() for e in extras}
    assert {"onnx", "onnxruntime"} <= names
    assert not names & {"timm", "torchvision", "torch"}  # each pulls (or is) a torch build of its own
    api = (ROOT / "docs" / "api.md").read_text()
    assert "pip freeze" in api and "-c keep-torch.txt" in api
