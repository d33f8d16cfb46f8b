"""Render docs/reference.md from the code: every metric, command and setting, so the docs cannot drift.

    python -m moescope.reference > docs/reference.md

tests/test_reference_doc.py fails when the committed file differs from what this prints.
"""
from __future__ import annotations

import argparse
import inspect


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    return [(name, helps.get(name) or "", p) for name, p in sub.choices.items()]


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest.upper()
        if action.choices and not action.option_strings:
            name = f"{action.dest.upper()} ({'|'.join(map(str, action.choices))})"
        help_text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in help_text:
            help_text = f"{help_text} (default {action.default})".strip()
        out.append((name, help_text))
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render() -> str:
    from moescope.analysis import METRICS
    from moescope.cli import build_parser
    from moescope.settings import Settings

    lines = ["# moescope reference", "",
             "Generated from the code by `python -m moescope.reference`; do not edit by hand. Metric definitions and",
             "their sources: `docs/METRICS.md`.", "", "## Metrics", "",
             "`store.metric(NAME, run=..., layers=..., steps=(lo, hi), checkpoint=..., by=\"step\"|\"window\", "
             "phase=..., ranks=[...], **options)`", "", "| metric | reads | default `by` | what |", "|---|---|---|---|"]
    for m in METRICS.values():
        lines.append(f"| `{m.name}` | {m.source} | {m.default_by} | {_cell(m.summary)} |")
    for m in METRICS.values():
        lines += ["", f"### {m.name}", "", inspect.cleandoc(m.doc)]
    lines += ["", "## Commands", ""]
    for name, help_text, parser in _subcommands(build_parser()):
        lines += [f"### moescope {name}", "", _cell(help_text), "", "| option | meaning |", "|---|---|"]
        lines += [f"| `{opt}` | {_cell(text)} |" for opt, text in _options(parser)]
        lines.append("")
    lines += ["## Settings", "", "Environment variables with the `MOESCOPE_` prefix (or `Settings(...)` in code).", "",
              "| setting | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        lines.append(f"| `{name}` | `MOESCOPE_{name.upper()}` | `{default!s}` | {_cell(field.description or '')} |")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
