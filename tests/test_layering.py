"""Dependencies point one way (README's Layout): analysis sits above storage, the collector never reaches up."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
        out[str(path.relative_to(ROOT))] = names
    return out


def test_no_collector_module_imports_analysis():
    offenders = {p: sorted(n for n in names if n.startswith("moescope.analysis"))
                 for p, names in imports_of("collector").items()}
    assert not {p: n for p, n in offenders.items() if n}


def test_no_analysis_module_reaches_into_the_metadata_tables():
    offenders = {p: sorted(n for n in names if n.startswith("moescope.collector.metadata"))
                 for p, names in imports_of("analysis").items()}
    assert not {p: n for p, n in offenders.items() if n}


def test_the_probe_never_imports_the_collector_at_module_level():
    for path in (ROOT / "probe").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: the local sink loads the store lazily, by design
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moescope.collector"):
                raise AssertionError(f"{path.relative_to(ROOT)} imports {node.module} at module level")
