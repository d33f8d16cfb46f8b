"""The command line: the demo records exactly what the model routed; mistakes are one line."""
import subprocess
import sys

import pytest

from moescope.cli import main
from moescope.analysis.store import AnalysisStore as Store


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moescope", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "store"
    assert main(["demo", "--no-serve", "--steps", "50", "--quiet", "--run", "demo-test", "--store", str(root)]) == 0
    store = Store(root)
    yield store
    store.close()


def test_demo_records_tokens_times_layers_times_k_routing_rows(demo_store):
    layers = demo_store.layers("demo-test")
    k = set(layers.top_k)
    assert k == {2} and len(layers) == 4
    # Every non-padding token of training, once per MoE layer per slot; drops are rows too.
    tokens = demo_store.sql("SELECT layer, count(*) AS n FROM token_stats WHERE phase = 'train' GROUP BY layer", run="demo-test")
    rows = demo_store.sql("SELECT layer, count(*) AS n, sum(dropped::INT) AS d FROM routing WHERE phase = 'train' GROUP BY layer",
                          run="demo-test")
    merged = tokens.merge(rows, on="layer", suffixes=("_tokens", "_rows"))
    assert len(merged) == 4
    assert (merged.n_rows == merged.n_tokens * 2).all()
    assert rows.d.sum() > 0  # capacity factor 1.25 really drops


def test_demo_expert_step_aggregates_equal_counting_routing_rows(demo_store):
    agg = demo_store.sql("""SELECT step, layer, expert, sum(tokens) AS tokens, sum(dropped) AS dropped FROM expert_step
                            WHERE phase = 'train' GROUP BY ALL ORDER BY ALL""", run="demo-test")
    counted = demo_store.sql("""SELECT step, layer, expert, count(*) AS tokens, sum(dropped::INT) AS dropped FROM routing
                                WHERE phase = 'train' GROUP BY ALL ORDER BY ALL""", run="demo-test")
    assert agg[["step", "layer", "expert"]].astype(int).equals(counted[["step", "layer", "expert"]].astype(int))
    assert (agg.tokens.to_numpy() == counted.tokens.to_numpy()).all()
    assert (agg.dropped.to_numpy() == counted.dropped.to_numpy()).all()
    assert sorted(agg.step.unique().tolist()) == list(range(1, 51))


def test_demo_lists_every_saved_checkpoint(demo_store):
    ckpts = demo_store.checkpoints("demo-test")
    assert ckpts.checkpoint.tolist() == ["step-0", "step-12", "step-25", "step-38", "step-50"]
    for path in ckpts.path:
        assert path.endswith(".pt")
    replayed = demo_store.sql("SELECT DISTINCT checkpoint FROM routing WHERE phase = 'eval' ORDER BY 1", run="demo-test")
    assert sorted(replayed.checkpoint) == sorted(ckpts.checkpoint)


def test_runs_and_check_report_the_demo_run(demo_store):
    result = run_cli("runs", "--store", str(demo_store.root))
    assert result.returncode == 0 and "demo-test" in result.stdout
    result = run_cli("check", "demo-test", "--store", str(demo_store.root))
    assert result.returncode == 0, result.stdout
    assert "OK" in result.stdout


def test_unknown_run_is_a_one_line_error(demo_store):
    assert_one_line_error(run_cli("check", "no-such-run", "--store", str(demo_store.root)), "unknown run 'no-such-run'")
    assert_one_line_error(run_cli("export", "no-such-run", "--out", "x.duckdb", "--store", str(demo_store.root)), "unknown run")


def test_store_path_that_is_not_writable_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = run_cli("demo", "--no-serve", "--steps", "1", "--store", str(tmp_path / "file" / "store"))
    assert_one_line_error(result, "not writable")


def test_missing_store_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("runs", "--store", str(tmp_path / "nothing-here")), "no store at")


def test_model_without_moe_layer_is_a_one_line_error(tmp_path):
    script = (
        "import sys, torch\n"
        "from moescope.cli import report_errors\n"
        "from moescope.probe import attach\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"
        "with report_errors():\n"
        "    with attach(model, sink='memory', run='r'):\n"
        "        pass\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "Linear")
