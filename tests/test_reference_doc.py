"""Every metric, command and setting is documented, and the committed reference is the code's own."""
from __future__ import annotations

import re
from pathlib import Path

from moescope.analysis import METRICS
from moescope.cli import build_parser
from moescope.reference import _options, _subcommands, render
from moescope.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_is_what_the_code_renders():
    assert (ROOT / "docs/reference.md").read_text() == render(), \
        "docs/reference.md is stale: run `python -m moescope.reference > docs/reference.md`"


def test_every_metric_has_a_definition_with_its_source():
    for metric in METRICS.values():
        doc = metric.doc.strip()
        assert len(doc) > 60 and metric.summary, f"metric {metric.name!r} needs a docstring defining it"
        assert re.search(r"\b(19|20)\d\d\b|METRICS\.md|docs/", doc), f"metric {metric.name!r} cites no source"


def test_every_command_and_option_has_help_and_a_row_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name, help_text, parser in _subcommands(build_parser()):
        assert help_text, f"command {name!r} has no help"
        assert f"`moescope {name}" in readme or f"moescope {name}`" in readme or f"`moescope {name} " in readme, \
            f"README's command table lacks `moescope {name}`"
        for option, text in _options(parser):
            assert text.strip(), f"moescope {name} {option} has no help"


def test_every_setting_is_described():
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 15, f"setting {name!r} needs a description"


def test_every_metrics_md_section_the_code_cites_exists():
    sections = {int(n) for n in re.findall(r"^(\d+)\. ", (ROOT / "docs/METRICS.md").read_text(), flags=re.M)}
    cited = set()
    for path in ROOT.glob("*/**/*.py"):
        if ".git" in path.parts or "tests" in path.parts:
            continue
        for ref in re.findall(r"METRICS\.md §([0-9–\-, §]+)", path.read_text(errors="replace")):
            for lo, hi in re.findall(r"(\d+)(?:[–-](\d+))?", ref):
                cited |= set(range(int(lo), int(hi or lo) + 1))
    assert cited and cited <= sections, sorted(cited - sections)
