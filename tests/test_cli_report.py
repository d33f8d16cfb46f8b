"""`moescope validate` / `moescope report` on the command line, and the README's incident example, run as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.analysis.store import AnalysisStore as Store

sys.path.insert(0, str(Path(__file__).parent / "analysis"))
from test_report import ONSET, write_incident_run  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moescope", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory whose ./moescope-data holds run "my-run" with a takeover planted at step ONSET."""
    root = tmp_path_factory.mktemp("incident")
    store = Store(root / "moescope-data")
    write_incident_run(store, "my-run")
    store.close()
    return root


def section(title: str) -> str:
    text = README.read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_incident_commands_run_as_written(workdir):
    block = re.search(r"```text\n(.*?)```", section("Investigate an incident"), flags=re.S).group(1)
    commands = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["moescope", "validate"], ["moescope", "report"]]
    validate = run_cli(*commands[0][1:], cwd=workdir)
    assert validate.returncode == 0 and "all passed" in validate.stdout, validate.stdout
    report = run_cli(*commands[1][1:], cwd=workdir)
    assert report.returncode == 0, report.stderr
    assert (workdir / "incident.html").stat().st_size > 1_000_000  # plotly.js is inside
    assert re.search(r"collaps(ing|ed) from step", (workdir / "incident.md").read_text())


def test_readme_incident_python_example_prints_the_planted_onset(workdir, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", section("Investigate an incident"), flags=re.S).group(1)
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "collaps" in out and str(ONSET) in out
    assert set(scope["evidence"].role) == {"took_over"}


def test_validate_exits_1_and_names_the_check_on_a_corrupt_capture(tmp_path):
    import pyarrow as pa

    from moescope.frame import Frame
    from moescope.schema import TABLES

    store = Store(tmp_path / "s")
    write_incident_run(store, "ok")
    tables = {name: store.sql(f"SELECT * EXCLUDE (run), 'bad' AS run FROM {name} WHERE step = 3", run="ok")
              for name in TABLES}
    tables["routing"]["expert"] += 100  # ids past E, as a capture reading the wrong buffer would write
    layers = store.layers("ok").drop(columns="run").to_dict("records")
    store.write_frame(Frame(run="bad", producer="p", seq=0, meta={"layers": layers}, tables={
        name: pa.Table.from_pandas(df, schema=TABLES[name], preserve_index=False) for name, df in tables.items()}))
    result = run_cli("validate", "bad", "--store", str(store.root))
    assert result.returncode == 1
    assert "FAIL expert_ids" in result.stdout and "e.g." in result.stdout


def test_report_and_validate_refuse_a_missing_store_and_unknown_runs(workdir, tmp_path):
    store = str(workdir / "moescope-data")
    for command in ("validate", "report"):
        assert_one_line_error(run_cli(command, "my-run", "--store", str(tmp_path / "nowhere")), "no store at")
        assert_one_line_error(run_cli(command, "nope", "--store", store), "unknown run 'nope'")
    assert not (tmp_path / "nowhere").exists()  # refusing did not create one
    assert_one_line_error(run_cli("report", "my-run", "--store", store, "--around", "500", "--out", str(tmp_path / "r.html")),
                          "outside the recorded steps")
