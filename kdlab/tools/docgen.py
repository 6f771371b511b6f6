"""The generated parts of the docs: the CLI reference, and each method card's option tables and recipe.

    python -m kdlab.tools.docgen --write     # regenerate docs/cli.md and the marked blocks of docs/methods/*.md
    python -m kdlab.tools.docgen --check     # exit 1 when a committed document differs from what the code says

A method card keeps its prose by hand; only the text between `<!-- BEGIN generated:KIND -->` and
`<!-- END generated:KIND -->` is rewritten (KIND: `options`, `recipe`, or `index` in
docs/methods/README.md). tests/test_docs.py runs the check, so a changed option, default or command
cannot leave the docs behind.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
METHOD_DIR = DOCS / "methods"
BLOCK = re.compile(r"(<!-- BEGIN generated:(\w+) -->\n)(.*?)(<!-- END generated:\2 -->)", re.S)


# ----------------------------------------------------------------------------------------------
# CLI reference


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.option_strings:
        return action.dest.upper()
    return action.dest


def _usage_part(action: argparse.Action) -> str:
    if not action.option_strings:
        name = _metavar(action)
        return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(action.nargs, name)
    flag = max(action.option_strings, key=len)
    if action.nargs == 0:
        text = flag
    elif action.nargs in ("+", "*"):
        text = f"{flag} {_metavar(action)} [...]"
    else:
        text = f"{flag} {_metavar(action)}"
    return text if action.required else f"[{text}]"


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _help_text(action: argparse.Action) -> str:
    """The help as `kdlab CMD --help` prints it: argparse expands `%(default)s` and its kin only there."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % {**params, "prog": "kdlab"}


def _describe(action: argparse.Action) -> str:
    parts = [_help_text(action)]
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        parts.append("choices: " + ", ".join(f"`{c}`" for c in action.choices))
    default = action.default
    if action.nargs != 0 and default not in (None, [], argparse.SUPPRESS) and "default" not in parts[0]:
        parts.append(f"default: `{default}`")
    if action.option_strings and action.required:
        parts.append("required")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in parts[0]:
        parts.append("repeatable")
    return "; ".join(p for p in parts if p)


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = [a for a in _visible(parser) if not isinstance(a, argparse._SubParsersAction)]
    if not rows:
        return ["No arguments."]
    lines = ["| argument | description |", "|---|---|"]
    for a in rows:
        names = ", ".join(a.option_strings) if a.option_strings else _metavar(a)
        if a.option_strings and a.nargs != 0:
            names += f" {_metavar(a)}"
        lines.append(f"| `{_cell(names)}` | {_cell(_describe(a))} |")
    return lines


def cli_markdown() -> str:
    from kdlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = [
        "# Command-line reference",
        "",
        "Generated from kdlab's argument parser by `python -m kdlab.tools.docgen --write`; "
        "edit the parser, not this file.",
        "Every command exits with code 2 and one line `kdlab: error: ...` on bad input.",
        "",
        "```text",
        "kdlab [--version] COMMAND ...",
        "```",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    lines += [f"| [`{name}`](#kdlab-{name}) | {_cell(helps.get(name) or '')} |" for name in sub.choices]
    for name, p in sub.choices.items():
        usage = " ".join(["kdlab", name] + [_usage_part(a) for a in _visible(p)])
        lines += [
            "",
            f"## kdlab {name}",
            "",
            (p.description or helps.get(name) or "").strip(),
            "",
            "```text",
            usage,
            "```",
            "",
        ]
        lines += _arguments_table(p)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Method cards


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
    return ", ".join(out)


# options that many terms share, described once where a term's class leaves them blank
COMMON_OPTIONS = {
    "weight": "multiplies the term's value (as the term defines it) in the total loss",
    "student_layers": "student layers to tap: module names (`layer2.1`) "
    "or zoo aliases (`stage2`, `last`, `embedding`); null: the term's default layers",
    "teacher_layers": "teacher layers, paired one to one with `student_layers`; null: the term's default layers",
    "pool": "average-pool the larger map when student and teacher spatial sizes differ",
    "p": "exponent of the attention map: sum over channels of |A_c|^p",
    "paraphraser_epochs": "epochs of the paraphraser's own training stage, before the student's",
    "paraphraser_lr": "learning rate of the paraphraser stage",
    "T": "temperature of the softmax on both logits",
    "paraphraser": "match each teacher's paraphrased factor (FT) instead of its raw map",
    "hint_lr": "learning rate of the hint stage",
    "k": "neighbours per sample, found in the teacher's embedding space within the batch",
    "eps": "probability mass moved off the true class",
    "kernel": "MMD kernel: linear, poly (degree 2, c = 0) or gaussian",
}


def options_table(term_name: str) -> str:
    from kdlab.losses import TERMS

    opts = TERMS[term_name].Options
    lines = [
        f"Options of the `{term_name}` term (`loss.terms.{term_name}` in a recipe; class `{opts.__name__}`):",
        "",
        "| option | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in opts.model_fields.items():
        default = field.get_default(call_default_factory=True)
        bounds = _bounds(field)
        kind = _type_name(field.annotation) + (f" ({bounds})" if bounds else "")
        meaning = field.description or COMMON_OPTIONS.get(name, "")
        lines.append(f"| `{name}` | {kind} | `{default}` | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def method_terms(method: str) -> list[str]:
    """The terms a method's card documents: the method's own, then any other its digits recipe uses."""
    from kdlab.methods import METHODS
    from kdlab.recipe_files import read_yaml

    terms = list(METHODS[method].terms)
    recipe = ROOT / "kdlab" / "recipes" / "digits" / f"{method}.yaml"
    if recipe.exists():
        terms += [t for t in (read_yaml(recipe).get("loss", {}).get("terms") or {}) if t not in terms]
    return terms


def recipe_block(method: str) -> str:
    path = ROOT / "kdlab" / "recipes" / "digits" / f"{method}.yaml"
    if not path.exists():
        return f"No digits recipe named `{method}.yaml`.\n"
    return f"`recipes/digits/{method}.yaml`:\n\n```yaml\n{path.read_text().rstrip()}\n```\n"


def method_index() -> str:
    from kdlab.methods import METHODS

    lines = ["| method | what it does | paper |", "|---|---|---|"]
    lines += [f"| [{m.name}]({m.name}.md) | {_cell(m.summary)} | {_cell(m.paper) or '-'} |" for m in METHODS.values()]
    return "\n".join(lines) + "\n"


def generated_block(method: str, kind: str) -> str:
    if kind == "options":
        terms = method_terms(method)
        if not terms:
            return "This method has no loss term of its own: only `loss.ce`, the weight of the label cross-entropy.\n"
        return "\n".join(options_table(t) for t in terms)
    if kind == "recipe":
        return recipe_block(method)
    if kind == "index":
        return method_index()
    raise ValueError(f"unknown generated block kind {kind!r}")


def refresh_card(text: str, method: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + generated_block(method, m.group(2)) + m.group(4), text)


# ----------------------------------------------------------------------------------------------


def expected_files() -> dict[Path, str]:
    """Every generated document and the text it should hold now."""
    out = {CLI_DOC: cli_markdown()}
    for card in sorted(METHOD_DIR.glob("*.md")):
        out[card] = refresh_card(card.read_text(), card.stem)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdlab.tools.docgen", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="rewrite the generated documents")
    g.add_argument("--check", action="store_true", help="exit 1 listing the documents that are out of date")
    args = p.parse_args(argv)
    expected = expected_files()
    stale = [path for path, text in expected.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {_shown(path)} (regenerate with: python -m kdlab.tools.docgen --write)")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(expected[path])
        print(f"wrote {_shown(path)}")
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
