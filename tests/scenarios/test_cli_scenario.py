"""`moescope scenario`: bad options end in one line naming what is wrong, before any training."""
import subprocess
import sys

import pytest


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moescope", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "--steps must be a positive int, got 0"),
    (["--run", "bad id!"], "invalid run id 'bad id!'"),
])
def test_bad_option_is_a_one_line_error(tmp_path, args, fragment):
    result = run_cli("scenario", "capacity", "--store", str(tmp_path / "store"), *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_scenario_lists_the_known_ones(tmp_path):
    result = run_cli("scenario", "no-such", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'no-such'" in result.stderr and "capacity" in result.stderr
