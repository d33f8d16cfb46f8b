"""`moescope alerts`: the README's example runs as written, `alerts test` lists what replay finds,
rules are addressed as the API addresses them, and mistakes end in one line with exit status 2."""
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, StepData, T, collapsed_layer, random_layer, uniform_layer, write_run  # noqa: E402
from moescope.analysis import alerts  # noqa: E402
from moescope.cli import main  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
COLLAPSED = range(8, 14)  # layer 3 routes every token to expert 0 at these steps


@pytest.fixture
def my_run(store):
    """Run "my-run": 20 steps of 4 layers; layer 3 (top-1) collapses for steps 8..13."""
    rng = np.random.default_rng(5)
    steps = []
    for step in range(20):
        s = StepData(step=step, checkpoint="c0", token_ids_T=rng.integers(0, 6, T))
        healthy = random_layer(3, rng)
        healthy.experts_TK, healthy.dropped_TK = healthy.experts_TK[:, :1], healthy.dropped_TK[:, :1]
        s.layers = [uniform_layer(0), random_layer(1, rng), random_layer(2, rng),
                    collapsed_layer(3) if step in COLLAPSED else healthy]
        steps.append(s)
    write_run(store, "my-run", steps, {0: (E, 2), 1: (E, 2), 2: (E, 2), 3: (E, 1)})
    return store


def _readme_alert_commands() -> list[list[str]]:
    section = README.read_text().split("## Alerts", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```text\n(.*?)```", section, flags=re.S)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _cli(store, *argv):
    return main([*argv, "--store", str(store.root)])


def test_the_readme_alert_example_runs_and_finds_the_planted_collapse(my_run, capsys):
    commands = _readme_alert_commands()
    assert [c[:3] for c in commands] == [["moescope", "alerts", "add"], ["moescope", "alerts", "test"]]
    for argv in commands:
        assert _cli(my_run, *argv[1:]) == 0
    out = capsys.readouterr().out
    [rule] = alerts.list_rules(my_run)
    assert rule["aggregation"] == "ema" and rule["ema_alpha"] == pytest.approx(2 / 6) and rule["layer"] == 3
    replayed = alerts.replay(my_run, rule, "my-run")
    assert [e["state"] for e in replayed] == ["firing", "resolved"]
    assert COLLAPSED[0] < replayed[0]["step"] < COLLAPSED[-1] < replayed[1]["step"]
    lines = out.splitlines()
    for event in replayed:  # the table `alerts test` prints holds each transition at its step
        assert any(line.split()[:2] == [str(event["step"]), event["state"]] for line in lines), out
    assert "steps 0..19 (20 evaluated)" in out


def test_alerts_test_says_when_a_rule_would_never_have_fired(my_run, capsys):
    _cli(my_run, "alerts", "add", "--name", "calm", "--metric", "maxvio", "--threshold", "1000", "--run", "my-run")
    assert _cli(my_run, "alerts", "test", "calm", "--run", "my-run") == 0
    assert "would never have fired" in capsys.readouterr().out


def test_delete_takes_an_id_or_a_name_as_the_api_does(my_run, capsys):
    for name in ("first", "second"):
        _cli(my_run, "alerts", "add", "--name", name, "--metric", "cv", "--threshold", "1")
    first, second = alerts.list_rules(my_run)
    assert _cli(my_run, "alerts", "delete", str(second["id"])) == 0
    assert _cli(my_run, "alerts", "delete", "--name", "first") == 0
    assert alerts.list_rules(my_run) == []
    assert f"deleted rule {second['id']} 'second'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["alerts", "add", "--name", "42", "--metric", "cv", "--threshold", "1"], "must not be all digits"),
    (["alerts", "add", "--name", "x", "--metric", "cv"], "needs --threshold"),
    (["alerts", "add", "--name", "x", "--metric", "cv", "--threshold", "1", "--run", "nope"], "unknown run 'nope'"),
    (["alerts", "add", "--name", "x", "--metric", "cv", "--threshold", "1", "--run", "my-run", "--layer", "9"],
     "layer 9 is not a layer of run 'my-run'"),
    (["alerts", "add", "--name", "x", "--metric", "cv", "--threshold", "1", "--webhook", "http://h/\r\nX: 1"],
     "control character"),
    (["alerts", "delete", "99999999999"], "out of range"),
    (["alerts", "delete", "²"], "no alert rule '²'"),
    (["alerts", "delete"], "needs a RULE"),
    (["alerts", "test", "nothing", "--run", "my-run"], "no alert rule 'nothing'"),
])
def test_alert_mistakes_are_one_line_and_exit_2(my_run, capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        _cli(my_run, *argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_alerts_test_needs_a_recorded_run(my_run, capsys):
    _cli(my_run, "alerts", "add", "--name", "x", "--metric", "cv", "--threshold", "1")
    for argv in (["alerts", "test", "x"], ["alerts", "test", "x", "--run", "nope"]):
        with pytest.raises(SystemExit):
            _cli(my_run, *argv)
        assert "run" in capsys.readouterr().err


def test_reading_alerts_of_a_store_that_does_not_exist_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo"
    with pytest.raises(SystemExit) as info:
        main(["alerts", "list", "--store", str(missing)])
    assert info.value.code == 2 and not missing.exists()
