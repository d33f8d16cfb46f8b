"""Every MoE family of the installed transformers, verified against what its experts received.

The families come from transformers' registry (moescope.probe.families.moe_families). Each
parametrised case builds one family tiny, runs it with and without the probe's hooks, and
asserts the committed docs/families.md row says exactly what this run found; a family that
cannot be built tiny here is then skipped with its reason, a family that fails fails.
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from moescope.probe import families  # noqa: E402

FAMILIES = families.moe_families_cached()
COMMITTED = families.parse(families.TABLE_PATH.read_text()) if families.TABLE_PATH.exists() else {}


def test_committed_table_lists_exactly_the_registry_families():
    assert sorted(COMMITTED) == FAMILIES, "run: python -m moescope.probe.families"


def test_readme_summary_is_the_committed_table_summary():
    readme = families.README_PATH.read_text()
    section = readme[readme.index(families.BEGIN):readme.index(families.END) + len(families.END)]
    assert section == families.readme_section(families.TABLE_PATH.read_text())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_routing_is_recorded_as_its_experts_received_it(model_type):
    result = families.verify(model_type)
    assert COMMITTED.get(model_type) == (result.status, result.detail), "run: python -m moescope.probe.families"
    if result.status == "not built":
        pytest.skip(f"{model_type} cannot be built tiny here: {result.detail}")
    assert result.status != "failed", result.detail
